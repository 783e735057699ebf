"""A throwaway PostgreSQL cluster that hands out one fresh database per test."""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from .dovecot import (
    README_HINT,
    die_with_parent,
    free_port,
    log_tail,
    make_base_dir,
    wait_group_gone,
)


def find_bindir() -> Path:
    """Return the directory holding initdb and postgres, newest version first."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        # Debian's /usr/bin/pg_config (libpq-dev) reports /usr/bin, which has no
        # initdb, so every candidate is checked for the server binaries.
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted((Path(p) for p in versions), key=_version_key, reverse=True)
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise RuntimeError(f"PostgreSQL server binaries (initdb, postgres) not found. {README_HINT}")


def _version_key(bindir: Path) -> tuple[int, ...]:
    """Turn /usr/lib/postgresql/15/bin into (15,) so versions sort numerically."""
    version = bindir.parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


class PostgresCluster:
    """A private PostgreSQL server on a loopback port with trust authentication."""

    host = "127.0.0.1"
    superuser = "postgres"

    def __init__(self) -> None:
        """Prepare state; call start() to initialise and launch the cluster."""
        self.base: Path | None = None
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._counter = itertools.count(1)

    @property
    def log_path(self) -> Path:
        """Return the path of the server log."""
        assert self.base is not None
        return self.base / "postgres.log"

    def _run_as(self) -> dict[str, Any]:
        """Return Popen arguments that drop root privileges to the postgres user."""
        if os.geteuid() != 0:
            return {}
        # PostgreSQL refuses to run as root; extra_groups=[] also drops root's
        # supplementary groups.
        return {"user": "postgres", "group": pwd.getpwnam("postgres").pw_gid, "extra_groups": []}

    def start(self, timeout: float = 30) -> None:
        """Run initdb into a temporary directory, start the server and wait for it."""
        bindir = find_bindir()
        self.base = make_base_dir("maildesk-pg-")
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        data, sockets = self.base / "data", self.base / "sock"
        initdb = subprocess.run(
            [
                str(bindir / "initdb"), "-D", str(data), "-U", self.superuser,
                "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
            ],
            capture_output=True, text=True, check=False, cwd=self.base, **self._run_as(),
        )  # fmt: skip
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}")
        sockets.mkdir()
        if os.geteuid() == 0:
            shutil.chown(sockets, user="postgres", group="postgres")
        self.port = free_port()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    str(bindir / "postgres"), "-D", str(data), "-p", str(self.port),
                    "-c", f"listen_addresses={self.host}",
                    "-c", f"unix_socket_directories={sockets}",
                    # Durability is pointless for a throwaway cluster; speed is not.
                    "-c", "fsync=off", "-c", "synchronous_commit=off",
                    "-c", "full_page_writes=off",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.base,
                # A separate session keeps Ctrl-C in pytest from killing the server
                # before the fixture's teardown stops it cleanly.
                start_new_session=True, preexec_fn=die_with_parent(signal.SIGQUIT),
                **self._run_as(),
            )  # fmt: skip
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Connect until the server accepts queries or the deadline passes."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with psycopg.connect(self.libpq_url("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                time.sleep(0.02)
        self.stop(remove=False)
        raise RuntimeError(
            f"PostgreSQL did not start on port {self.port}.\n"
            f"--- {self.log_path} ---\n{log_tail(self.log_path)}"
        )

    def libpq_url(self, dbname: str) -> str:
        """Return a plain libpq URL (for psycopg.connect) for a database."""
        return f"postgresql://{self.superuser}@{self.host}:{self.port}/{dbname}"

    def url(self, dbname: str) -> str:
        """Return a SQLAlchemy URL using the psycopg 3 driver for a database."""
        return f"postgresql+psycopg://{self.superuser}@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database and return its name."""
        name = name or f"test_{next(self._counter)}"
        with psycopg.connect(self.libpq_url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database even if a test left connections open."""
        with psycopg.connect(self.libpq_url("postgres"), autocommit=True) as conn:
            # FORCE terminates sessions that a forgotten engine or pool kept open.
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(name)))

    def stop(self, remove: bool = True) -> None:
        """Stop the server with a fast shutdown, then delete the cluster."""
        if self.process is not None:
            # SIGINT asks the postmaster for a "fast" shutdown: abort sessions, exit.
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            wait_group_gone(self.process.pid)
        if remove and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
