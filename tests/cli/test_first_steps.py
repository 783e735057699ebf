"""A newcomer's first steps, as processes: the quickstart, a mail, the maildir read as it is,
then the printed `tickets list` command; no traceback and no stray file on the way.
"""

from __future__ import annotations

import os
import shlex
import signal
import smtplib
import socket
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

from rig.dovecot import free_port

from maildesk.cli.quickstart import DEMO_CUSTOMER

MAILDESK = str(Path(sys.executable).parent / "maildesk")
STATE = Path("/var/lib/maildesk")
# The README's mail, word for word.
SUBJECT = "L'export PDF ne marche plus"
TEXT = "Bonjour,\n\nDepuis ce matin l'export PDF échoue.\n\nCamille"


def newcomer_env() -> dict[str, str]:
    """The environment of someone who never configured maildesk."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MAILDESK_", "NOTIFY_"))}


def wait_for(condition: object, what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"no {what}: {log.read_text()}"
        time.sleep(0.05)


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_quickstart_then_mail_then_tickets_list(tmp_path: Path) -> None:
    state_existed = STATE.exists()
    # The checkout's sample lies in the directory one starts from: nothing may read it.
    sample = "this is no TOML: reading it is a mistake ["
    (tmp_path / "config.toml").write_text(sample)
    port = free_port()
    log = tmp_path / "quickstart.log"
    process = subprocess.Popen(
        [MAILDESK, "quickstart", "--port", str(port)],
        cwd=tmp_path, env=newcomer_env(), stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    demo = tmp_path / "maildesk-demo"
    new = demo / "outgoing" / "new"
    try:
        wait_for(lambda: '"event": "started"' in log.read_text(), "start", log)
        printed = [line.strip() for line in log.read_text().splitlines()]
        command = next(line for line in printed if line.endswith(" tickets list"))
        assert command == f"{MAILDESK} --config maildesk-demo/config.toml tickets list"

        mail = EmailMessage()
        mail["From"] = f"{DEMO_CUSTOMER[1]} <{DEMO_CUSTOMER[0]}>"
        mail["To"] = "support@maildesk.localhost"
        mail["Subject"] = SUBJECT
        mail.set_content(TEXT)
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.send_message(mail)
        # The acknowledgement, and the agent's copy of ticket #1.
        wait_for(lambda: new.is_dir() and len(list(new.iterdir())) == 2, "two mails", log)

        listed = subprocess.run(shlex.split(command), cwd=tmp_path, env=newcomer_env(),
                                capture_output=True, text=True, timeout=60)
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text()

    # `cat` shows the text: 8-bit UTF-8, neither quoted-printable nor base64.
    mails = [path.read_bytes() for path in new.iterdir()]
    copy = next(raw for raw in mails if b"To: Alex Martin" in raw)
    ack = next(raw for raw in mails if raw is not copy)
    assert "Depuis ce matin l'export PDF échoue.".encode() in copy
    assert "Nous avons bien reçu votre demande".encode() in ack
    for raw in mails:
        assert b"quoted-printable" not in raw.lower()
        assert b"Content-Transfer-Encoding: 8bit" in raw

    assert (listed.returncode, listed.stderr) == (0, "")
    headings, ticket = listed.stdout.splitlines()
    assert headings.split()[:2] == ["TICKET", "STATUS"]
    assert ticket.startswith("#1 ") and SUBJECT in ticket and DEMO_CUSTOMER[0] in ticket

    # No stray file: the demo directory, the log, and the untouched sample, nothing else.
    assert {p.name for p in tmp_path.iterdir()} == {"maildesk-demo", "quickstart.log",
                                                    "config.toml"}
    assert (tmp_path / "config.toml").read_text() == sample
    assert "config.toml" in files_under(demo)
    assert STATE.exists() == state_existed


def test_a_command_before_db_upgrade_says_so_and_creates_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "desk.toml"
    config.write_text(f'[desk]\nstate_dir = "{state}"\n')
    for command in (["tickets", "list"], ["run"], ["db", "status"], ["agents", "list"]):
        result = subprocess.run([MAILDESK, "--config", str(config), *command],
                                capture_output=True, text=True, env=newcomer_env(), timeout=60)
        assert result.returncode == 1, command
        assert result.stderr == (
            f"maildesk: error: the database {state / 'maildesk.sqlite3'} does not exist; "
            f"run `maildesk --config {config} db upgrade` first\n"
        ), command
        assert not state.exists()
    upgraded = subprocess.run([MAILDESK, "--config", str(config), "db", "upgrade"],
                              capture_output=True, text=True, env=newcomer_env(), timeout=60)
    assert upgraded.returncode == 0, upgraded.stderr
    assert (state / "maildesk.sqlite3").is_file()


def test_a_port_in_use_is_one_line_after_the_banner(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([MAILDESK, "quickstart", "--port", str(port)], cwd=tmp_path,
                                capture_output=True, text=True, env=newcomer_env(), timeout=60)
    assert result.returncode == 1
    assert result.stderr == (
        f"maildesk: error: [listener] cannot listen on 127.0.0.1:{port}: address already in use\n"
    )
    assert result.stdout.startswith("maildesk quickstart: state in ")


def test_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "desk.toml"
    config.write_text(f'[store]\nurl = "postgresql+psycopg://desk@127.0.0.1:{free_port()}/desk"\n'
                      "[listener]\nenabled = false\n")
    for command in (["run"], ["tickets", "list"], ["db", "upgrade"]):
        result = subprocess.run([MAILDESK, "--config", str(config), *command],
                                capture_output=True, text=True, env=newcomer_env(), timeout=60)
        assert result.returncode == 1, command
        assert result.stderr.startswith("maildesk: error: cannot open the database: "), command
        assert result.stderr.count("\n") == 1, result.stderr
