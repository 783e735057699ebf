"""A throwaway Dovecot IMAP server and an IMAP account helper for tests."""

from __future__ import annotations

import contextlib
import ctypes
import grp
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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imapclient import IMAPClient

README_HINT = "Run the README's test command, ./scripts/test, which installs the servers."

# Dovecot answers "[APPENDUID <uidvalidity> <uid>]" because UIDPLUS is enabled.
_APPENDUID = re.compile(rb"\[APPENDUID \d+ (\d+)\]")


_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> Callable[[], None]:
    """Return a preexec_fn that makes the child receive `sig` when pytest dies."""

    # Without this a killed pytest run would leave servers running forever.
    def preexec() -> None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, sig)

    return preexec


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
            # BODY.PEEK leaves the \Seen flag alone, so tests observe only what the app did.
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
                    # The folder may not exist yet if another process is about to create it.
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

    def __init__(self, separator: str = "/", oauth2_args: str | None = None) -> None:
        """Prepare paths; call start() to launch the server. `separator` is the folder
        hierarchy delimiter that the server shows its clients. `oauth2_args`, when given, is
        the text of an oauth2 passdb's args file (introspection_url and the like): the server
        then also takes XOAUTH2 and OAUTHBEARER logins, checked by that passdb, while PLAIN and
        LOGIN still check the users' passwd-files.
        """
        self.separator = separator
        self.oauth2_args = oauth2_args
        self.base: Path | None = None
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._counter = itertools.count(1)
        self._mail_uid = self._mail_gid = -1

    @property
    def log_path(self) -> Path:
        """Return the path of Dovecot's log file."""
        assert self.base is not None
        return self.base / "dovecot.log"

    def start(self, timeout: float = 10) -> None:
        """Write a config, launch `dovecot -F` and wait until it greets."""
        binary = shutil.which("dovecot", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
        if binary is None:
            raise RuntimeError(f"The dovecot binary was not found. {README_HINT}")
        self.base = make_base_dir("maildesk-rig-")
        self.port = free_port()
        self._mail_uid, self._mail_gid = self._prepare_dirs()
        if self.oauth2_args is not None:
            (self.base / "dovecot-oauth2.conf.ext").write_text(self.oauth2_args)
        (self.base / "dovecot.conf").write_text(self._config())
        self._launch(timeout)

    def restart(self, timeout: float = 10) -> None:
        """Stop Dovecot and start it again on the same port, with the same users and mail."""
        self.stop(remove=False)
        self._launch(timeout)

    def idling_sessions(self) -> int:
        """How many IMAP sessions are in IDLE right now, as their process titles say."""
        assert self.process is not None
        count = 0
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if os.getpgid(int(proc.name)) != self.process.pid:
                    continue
                title = (proc / "cmdline").read_bytes()
            except OSError:
                continue  # The process ended meanwhile.
            # verbose_proctitle shows the command in hand: "…/imap [user1 127.0.0.1 IDLE]".
            count += b"/imap [" in title and title.rstrip(b"\0").endswith(b" IDLE]")
        return count

    def _launch(self, timeout: float) -> None:
        binary = shutil.which("dovecot", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
        assert binary is not None and self.base is not None
        config = self.base / "dovecot.conf"
        with (self.base / "dovecot.stderr").open("ab") as stderr:
            self.process = subprocess.Popen(
                [binary, "-F", "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                # A separate session lets stop() kill leftover children as a group.
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
        self._wait_ready(timeout)

    def _prepare_dirs(self) -> tuple[int, int]:
        """Create the run/state/mail directories and return the mail uid/gid."""
        assert self.base is not None
        for name in ("run", "state", "mail", "users"):
            # chmod after mkdir, because mkdir's mode is filtered through the umask.
            (self.base / name).mkdir()
            (self.base / name).chmod(0o755)
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
            internal_user, internal_group, login_user = "dovecot", "dovecot", "dovenull"
        else:
            # Without root, every service runs as the current user and group.
            internal_user = login_user = pwd.getpwuid(os.getuid()).pw_name
            internal_group = grp.getgrgid(os.getgid()).gr_name
        oauth2 = self._oauth2_passdb()  # Nothing, unless oauth2_args were given.
        return textwrap.dedent(f"""\
            # Generated by tests/rig/dovecot.py for one test session.
            instance_name = {base.name}
            base_dir = {base}/run
            state_dir = {base}/state
            log_path = {base}/dovecot.log
            info_log_path = {base}/dovecot.log
            protocols = imap
            listen = {self.host}
            # Process titles show each session's command, so a test can see an IDLE.
            verbose_proctitle = yes
            ssl = no
            disable_plaintext_auth = no
            auth_mechanisms = plain login{" xoauth2 oauthbearer" if self.oauth2_args else ""}
            auth_verbose = yes
            # Failed logins are answered after the next 0.5 s failure-timer tick, not 2 s.
            auth_failure_delay = 0
            default_internal_user = {internal_user}
            default_internal_group = {internal_group}
            default_login_user = {login_user}
            first_valid_uid = {min(self._mail_uid, 500)}
            first_valid_gid = {min(self._mail_gid, 500)}
            mail_location = maildir:~/Maildir
            # Most servers show "/" as the hierarchy separator; Maildir++ would show ".".
            namespace inbox {{
              inbox = yes
              separator = {self.separator}
            }}
            {oauth2}# One passwd-file per user: see add_user() for why not a shared file.
            passdb {{
              driver = passwd-file
              args = scheme=PLAIN {base}/users/%u
            }}
            userdb {{
              driver = passwd-file
              args = {base}/users/%u
            }}
            # No chroot: the base directory is not laid out as a chroot.
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
              # Without this socket Dovecot skips its growing per-IP penalty for
              # failed logins, which would slow every later login from 127.0.0.1.
              unix_listener anvil-auth-penalty {{
                mode = 0
              }}
            }}
            """)

    def _oauth2_passdb(self) -> str:
        """The oauth2 passdb's block, ahead of the passwd-file one, or nothing without it."""
        if self.oauth2_args is None:
            return ""
        assert self.base is not None
        # Only the token mechanisms reach this passdb, so a password never goes to the
        # introspection endpoint, and its verdict is final, so a token is never compared with
        # a password either. The lines are indented as the config's template is, which
        # textwrap.dedent strips once this text is in.
        lines = [
            "# Tokens are checked by the test's own introspection endpoint.",
            "passdb {",
            "  driver = oauth2",
            "  mechanisms = xoauth2 oauthbearer",
            f"  args = {self.base}/dovecot-oauth2.conf.ext",
            "  result_failure = return-fail",
            "  result_internalfail = return-fail",
            "}",
            "",
        ]
        return f"\n{' ' * 12}".join(lines)

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
        # The base directory stays behind so its config and logs can be inspected.
        self.stop(remove=False)
        assert self.base is not None
        raise RuntimeError(
            f"Dovecot did not start on port {self.port}.\n"
            f"--- {self.log_path} ---\n{log_tail(self.log_path)}\n"
            f"--- stderr ---\n{log_tail(self.base / 'dovecot.stderr')}"
        )

    def add_user(self, username: str | None = None, password: str | None = None) -> ImapAccount:
        """Create a new user (with its own passwd-file) and return its account."""
        assert self.base is not None
        username = username or f"user{next(self._counter)}"
        password = password or secrets.token_hex(8)
        if "/" in username:
            raise ValueError(f"IMAP usernames here cannot contain '/': {username!r}")
        home = self.base / "mail" / username
        # Dovecot re-reads a changed passwd-file at most once per second, so a user
        # appended to a shared file right after a login stays unknown for up to a
        # second; a new file per user (the path contains %u) is always read fresh.
        # Mode "x" makes a duplicate username fail instead of changing a password.
        path = self.base / "users" / username
        with path.open("x") as entry:
            entry.write(
                f"{username}:{{PLAIN}}{password}:{self._mail_uid}:{self._mail_gid}::{home}::\n"
            )
        path.chmod(0o644)
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
