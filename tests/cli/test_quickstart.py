"""The README's run command: `maildesk quickstart` on its embedded defaults."""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
import sys
import time
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from rig.dovecot import free_port

from maildesk.cli.quickstart import (
    DEMO_AGENT,
    DEMO_CUSTOMER,
    quickstart_settings,
    write_demo_config,
)
from maildesk.config import load_settings


def test_quickstart_answers_a_mail_into_the_local_maildir(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "demo"
    log = tmp_path / "out.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "maildesk", "quickstart", "--state-dir", str(state),
         "--port", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 30
        while '"event": "started"' not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        assert "smtplib.SMTP" in log.read_text()  # The printed instructions say how to send.
        mail = EmailMessage()
        mail["From"], mail["To"] = DEMO_CUSTOMER[0], "support@maildesk.localhost"
        mail["Subject"] = "Bonjour"
        mail.set_content("Mon export ne marche plus.")
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.send_message(mail)
        new = state / "outgoing" / "new"
        while time.monotonic() < deadline and len(list(new.glob("*"))) < 2:
            time.sleep(0.05)
        delivered = [message_from_bytes(p.read_bytes(), policy=policy.default)
                     for p in new.iterdir()]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()
    by_recipient = {m["To"].addresses[0].addr_spec: m for m in delivered}
    assert sorted(by_recipient) == sorted([DEMO_CUSTOMER[0], DEMO_AGENT[0]])
    ack = by_recipient[DEMO_CUSTOMER[0]]
    assert "[#1]" in str(ack["Subject"])
    assert "CNIL" in ack.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(e.get("event") == "mail processed" and e["outcome"] == "ticket" for e in events)


def test_run_never_creates_demo_data(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[desk]\nstate_dir = "{tmp_path}"\n[listener]\nenabled = false\n')
    run = [sys.executable, "-m", "maildesk", "--config", str(config)]
    assert subprocess.run([*run, "db", "upgrade"], capture_output=True).returncode == 0
    listed = subprocess.run([*run, "accounts", "list", "--json"], capture_output=True, text=True)
    assert json.loads(listed.stdout) == []


def test_the_demo_config_reads_back_as_the_quickstart_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = quickstart_settings(Path("maildesk-demo"), 2600)
    path = write_demo_config(settings)
    assert path == tmp_path / "maildesk-demo" / "config.toml"
    assert load_settings(path) == settings
    # Its first lines say how to use it, relative to where the quickstart was started.
    assert "--config maildesk-demo/config.toml tickets list" in path.read_text()
