"""The Prometheus endpoint, scraped from a running daemon with prometheus-client's own parser,
and `maildesk status`."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from e2e import CUSTOMER, customer_mail, running_desk
from prometheus_client.parser import text_string_to_metric_families
from rig.dovecot import free_port
from rig.smtp import RecordingSMTPServer


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_endpoint_counts_mails_in_and_out_and_shows_the_queues(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    port = free_port()
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    with running_desk(tmp_path, url, imap=None, smtp=smtp_server,
                      extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n') as desk:  # fmt: skip
        with smtplib.SMTP("127.0.0.1", desk.listener_port, timeout=10) as client:
            client.send_message(customer_mail())
        smtp_server.wait_for(2, timeout=20)  # The acknowledgement and the agent's copy.
        deadline = time.monotonic() + 10
        while True:
            samples = scrape(port)
            # The sender counts a mail when the relay took it and records it sent a group at a
            # time just after: both are waited for.
            if (samples.get(("maildesk_send_results_total", (("result", "sent"),))) == 2
                    and samples.get(("maildesk_queue_depth", (("queue", "outbox"),))) == 0):
                break
            assert time.monotonic() < deadline, samples
            time.sleep(0.05)
        status = subprocess.run(
            [sys.executable, "-m", "maildesk", "--config", str(desk.config), "status", "--json"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    assert samples[("maildesk_mails_stored_total", (("source", "smtp"),))] == 1
    assert samples[("maildesk_mails_filed_total", (("outcome", "ticket"),))] == 1
    assert samples[("maildesk_filing_seconds_count", ())] == 1
    assert samples[("maildesk_delivery_seconds_count", ())] == 2
    assert samples[("maildesk_queue_depth", (("queue", "intake"),))] == 0
    assert samples[("maildesk_queue_depth", (("queue", "outbox"),))] == 0
    assert ("maildesk_queue_oldest_seconds", (("queue", "intake"),)) not in samples
    figures = json.loads(status.stdout)
    assert figures["last_24h"] == {"in": {"ticket": 1}, "out": {"sent": 2}}
    assert {q["queue"]: q["depth"] for q in figures["queues"]} == {
        "intake": 0, "outbox": 0, "outbox_failed": 0}
    assert CUSTOMER in smtp_server.mails[0].rcpt_tos + smtp_server.mails[1].rcpt_tos


def test_a_metrics_port_in_use_is_one_line(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    import socket

    from e2e import seed, write_config

    from maildesk.store import database

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
        config = write_config(tmp_path, url, imap=None, smtp=smtp_server,
                              listener_port=free_port(),
                              extra=f'[metrics]\nlisten = "127.0.0.1:{taken}"\n')  # fmt: skip
        engine = database.make_engine(url)
        database.upgrade(engine)
        seed(engine)
        engine.dispose()
        result = subprocess.run(
            [sys.executable, "-m", "maildesk", "--config", str(config), "run"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"maildesk: error: [metrics] cannot listen on 127.0.0.1:{taken}: address already in use")
    assert "Traceback" not in result.stderr + result.stdout
