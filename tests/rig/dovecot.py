"""A throwaway Dovecot IMAP server and an IMAP account helper for tests."""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imapclient import IMAPClient

README_HINT = "Install the test servers and run the test command described in the README."

# Dovecot answers "[APPENDUID <uidvalidity> <uid>]" because UIDPLUS is enabled.
_APPENDUID = re.compile(rb"\[APPENDUID \d+ (\d+)\]")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_base_dir(prefix: str) -> Path:
    """Create a world-traversable temporary directory under /tmp."""
    # Server processes drop privileges to service users, so every parent of their
    # directories must be traversable; pytest's own tmp root is mode 0700.
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    return base


def log_tail(path: Path, lines: int = 40) -> str:
    """Return the last lines of a log file, or a note that it does not exist."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


@dataclass
class ImapAccount:
    """An IMAP mailbox on the rig's Dovecot, with helpers for tests."""

    host: str
    port: int
    username: str
    password: str

    @contextlib.contextmanager
    def client(self) -> Iterator[IMAPClient]:
        """Yield a logged-in IMAPClient and log out afterwards."""
        with IMAPClient(self.host, port=self.port, ssl=False, timeout=10) as imap:
            imap.login(self.username, self.password)
            yield imap

    def append(self, raw: bytes, folder: str = "INBOX") -> int | None:
        """Append a raw message to a folder and return its UID if reported."""
        with self.client() as imap:
            response = imap.append(folder, raw)
        match = _APPENDUID.search(response)
        return int(match.group(1)) if match else None

    def uids(self, folder: str = "INBOX") -> list[int]:
        """Return the sorted UIDs of all messages in a folder."""
        with self.client() as imap:
            imap.select_folder(folder, readonly=True)
            return sorted(imap.search("ALL"))

    def fetch_all(self, folder: str = "INBOX") -> list[bytes]:
        """Return the raw bytes of every message in a folder, in UID order."""
        with self.client() as imap:
            imap.select_folder(folder, readonly=True)
            uids = sorted(imap.search("ALL"))
            if not uids:
                return []
            # BODY.PEEK keeps the \\Seen flag untouched so tests observe what the app did.
            data = imap.fetch(uids, ["BODY.PEEK[]"])
            return [data[uid][b"BODY[]"] for uid in uids]

    def wait_for_count(self, folder: str, n: int, timeout: float = 10) -> list[int]:
        """Poll until a folder holds exactly n messages and return their UIDs."""
        deadline = time.monotonic() + timeout
        last: int | None = None
        with self.client() as imap:
            while True:
                try:
                    # Re-selecting makes Dovecot rescan the maildir, so the count is fresh.
                    last = int(imap.select_folder(folder, readonly=True)[b"EXISTS"])
                except IMAPClient.Error:
                    # The folder may not exist yet when another process creates it.
                    last = None
                if last == n:
                    return sorted(imap.search("ALL"))
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{self.username}/{folder}: expected {n} messages, have {last}"
                    )
                time.sleep(0.05)


class DovecotServer:
    """A private Dovecot instance on a loopback port with passwd-file users."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        """Prepare paths; call start() to launch the server."""
        self.base: Path | None = None
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._counter = itertools.count(1)
        self._users_lock = threading.Lock()

    @property
    def log_path(self) -> Path:
        """Return the path of Dovecot's log file."""
        assert self.base is not None
        return self.base / "dovecot.log"

    @property
    def users_path(self) -> Path:
        """Return the directory holding one passwd-file per user."""
        assert self.base is not None
        return self.base / "users"

    def start(self, timeout: float = 10) -> None:
        """Write a config, launch `dovecot -F` and wait until it greets."""
        binary = shutil.which("dovecot", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
        if binary is None:
            raise RuntimeError(f"The dovecot binary was not found. {README_HINT}")
        self.base = make_base_dir("maildesk-rig-")
        self.port = free_port()
        self._mail_uid, self._mail_gid = self._prepare_dirs()
        config = self.base / "dovecot.conf"
        config.write_text(self._config())
        with (self.base / "dovecot.stderr").open("wb") as stderr:
            self.process = subprocess.Popen(
                [binary, "-F", "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                # A separate session lets stop() kill leftover children as a group.
                start_new_session=True,
            )
        self._wait_ready(timeout)

    def _prepare_dirs(self) -> tuple[int, int]:
        """Create the run/state/mail directories and return the mail uid/gid."""
        assert self.base is not None
        for name in ("run", "state", "mail", "users"):
            (self.base / name).mkdir(mode=0o755)
        if os.geteuid() == 0:
            # Dovecot refuses to access mail as root, so mail belongs to `mail`.
            entry = pwd.getpwnam("mail")
            os.chown(self.base / "mail", entry.pw_uid, entry.pw_gid)
            return entry.pw_uid, entry.pw_gid
        return os.getuid(), os.getgid()

    def _config(self) -> str:
        """Return the dovecot.conf text for this instance."""
        assert self.base is not None
        base = self.base
        if os.geteuid() == 0:
            internal_user, login_user = "dovecot", "dovenull"
        else:
            internal_user = login_user = pwd.getpwuid(os.getuid()).pw_name
        return textwrap.dedent(f"""\
            # Generated by tests/rig/dovecot.py for one test session.
            instance_name = maildesk-rig-{base.name}
            base_dir = {base}/run
            state_dir = {base}/state
            log_path = {base}/dovecot.log
            info_log_path = {base}/dovecot.log
            protocols = imap
            listen = {self.host}
            ssl = no
            disable_plaintext_auth = no
            auth_mechanisms = plain login
            auth_verbose = yes
            auth_failure_delay = 0
            default_internal_user = {internal_user}
            default_login_user = {login_user}
            first_valid_uid = {min(self._mail_uid, 500)}
            first_valid_gid = {min(self._mail_gid, 500)}
            mail_location = maildir:~/Maildir
            passdb {{
              driver = passwd-file
              args = scheme=PLAIN {self.users_path}/%u
            }}
            userdb {{
              driver = passwd-file
              args = {self.users_path}/%u
            }}
            service imap-login {{
              chroot =
              inet_listener imap {{
                address = {self.host}
                port = {self.port}
              }}
              inet_listener imaps {{
                port = 0
              }}
            }}
            service anvil {{
              chroot =
              unix_listener anvil-auth-penalty {{
                mode = 0
              }}
            }}
            """)

    def _wait_ready(self, timeout: float) -> None:
        """Connect until Dovecot sends its IMAP greeting or the deadline passes."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as sock:
                    if sock.recv(100).startswith(b"* OK"):
                        return
            except OSError:
                time.sleep(0.01)
        self.stop(remove=False)
        assert self.base is not None
        raise RuntimeError(
            f"Dovecot did not start on port {self.port}.\n"
            f"--- {self.log_path} ---\n{log_tail(self.log_path)}\n"
            f"--- stderr ---\n{log_tail(self.base / 'dovecot.stderr')}"
        )

    def add_user(self, username: str | None = None, password: str | None = None) -> ImapAccount:
        """Append a fresh user to the passwd-file and return its account."""
        assert self.base is not None
        with self._users_lock:
            username = username or f"user{next(self._counter)}"
            password = password or secrets.token_hex(8)
            home = self.base / "mail" / username
            line = f"{username}:{{PLAIN}}{password}:{self._mail_uid}:{self._mail_gid}::{home}::\n"
            # Dovecot re-reads a changed passwd-file at most once per second, so a user
            # appended to a shared file right after a login stays unknown; a new file
            # per user (the path contains %u) is always read fresh.
            if "/" in username or (self.users_path / username).exists():
                raise ValueError(f"Invalid or duplicate IMAP username: {username!r}")
            (self.users_path / username).write_text(line)
        return ImapAccount(self.host, self.port, username, password)

    def stop(self, remove: bool = True) -> None:
        """Stop Dovecot and its children, then remove the base directory."""
        if self.process is not None:
            # Signalling the whole group stops in milliseconds; signalling only the
            # master makes it wait about a second for its children.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            wait_group_gone(self.process.pid)
        if remove and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)


def wait_group_gone(pgid: int, timeout: float = 5) -> None:
    """Wait until a process group is empty, then SIGKILL whatever is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
