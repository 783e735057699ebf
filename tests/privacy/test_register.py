"""The record of processing (GDPR Art. 30), printed from the config."""

from __future__ import annotations

import json

from support_fixtures import Desk

from maildesk.config import ImapSettings, PrivacySettings, SecuritySettings, Settings
from maildesk.privacy.register import record, to_markdown


def test_the_record_comes_from_the_config() -> None:
    settings = Settings(
        privacy=PrivacySettings(
            controller="Acme Support GmbH", controller_address="1 Hauptstraße, Berlin",
            dpo_email="privacy@acme.example", retention_years=3, quarantine_days=14,
            audit_days=200, us_entity="Acme Inc., Texas",
            processors=("Hetzner Online GmbH (hosting)",),
            security_measures=("Disk encryption of the database server",),
        ),
        imap=ImapSettings(enabled=True, tls="ssl", username="desk", password="x"),  # type: ignore[arg-type]
        security=SecuritySettings(trusted_authserv_id="mx.acme.example"),
    )
    data = record(settings)
    assert data["controller"] == {"name": "Acme Support GmbH",
                                  "address": "1 Hauptstraße, Berlin"}
    assert data["dpo"] == {"email": "privacy@acme.example"}
    assert "Processor: Hetzner Online GmbH (hosting)" in data["recipients"]
    [transfer] = data["transfers"]
    assert transfer["recipient"] == "Acme Inc., Texas"
    assert "Standard Contractual Clauses" in transfer["safeguard"]
    assert [r["period"] for r in data["retention"]] == [
        "3 years after the account's deactivation", "14 days", "200 days"]
    measures = data["security_measures"]
    assert measures[-1] == "Disk encryption of the database server"
    assert any("mx.acme.example" in m for m in measures)
    assert any("IMAP with TLS mode 'ssl'" in m for m in measures)
    markdown = to_markdown(data)
    for heading in ("## Controller", "## Purposes", "## Legal basis",
                    "## Categories of personal data", "## Recipients",
                    "## Transfers outside the European Union", "## Retention",
                    "## Security measures"):
        assert f"\n{heading}\n" in markdown, heading
    assert "- Acme Inc., Texas (United States), only for companies" in markdown
    assert "- Accounts and all their tickets, messages, attachments and mails: 3 years" in (
        markdown)
    assert "Neocase" not in markdown


def test_privacy_register_prints_markdown_or_json(desk: Desk) -> None:
    markdown = desk.cli("privacy", "register")
    assert markdown.code == 0
    assert markdown.out.startswith("# Record of processing activities")
    assert "Neocase Software, 91 boulevard National" in markdown.out
    as_json = json.loads(desk.cli("privacy", "register", "--json").out)
    assert as_json["retention"][0]["period"] == "5 years after the account's deactivation"
