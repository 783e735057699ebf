"""The record of processing activities (GDPR Art. 30) of the support desk, from the config.

What maildesk does with personal data is fixed by its code (the categories it stores, the
rules it applies); who the controller, the DPO, the US subsidiary and the processors are, how
long data are kept and how the mail is carried come from the config, so the record is always
the one of this installation. `maildesk privacy register` prints it as Markdown or JSON.
"""

from __future__ import annotations

from typing import Any

from maildesk.config import Settings


def _security_measures(settings: Settings) -> list[str]:
    """The measures that this installation's config shows, then the configured extra ones."""
    measures = [
        "Access restricted to the support team's agents; staff of the US subsidiary see a "
        "company's data only while it subscribes to after-hours support",
        "An audit event for every access to personal data (mails delivering ticket content to "
        "an agent, CLI reads, exports, rectifications, erasures), without message bodies",
        "Reply addresses signed with an HMAC key, bound to the account or agent they were "
        "issued to, and revocable per ticket",
        "Mail from addresses without an active account is quarantined, never filed or relayed",
        f"Bounded intake: mails over {settings.limits.max_mail_bytes} bytes or beyond the "
        "configured shape limits are refused or quarantined; automatic mail is rate-limited",
        "Secrets (passwords, reply keys) never reach the logs; logs never contain message "
        "bodies",
        f"Automatic erasure: {settings.privacy.retention_years} years after an account's "
        f"deactivation, {settings.privacy.quarantine_days} days for strangers' quarantined "
        "mail",
    ]
    if settings.imap.enabled:
        measures.append(f"Mailbox read over IMAP with TLS mode {settings.imap.tls!r}")
    if settings.smtp.transport == "smtp":
        measures.append(f"Outgoing mail sent over SMTP with TLS mode {settings.smtp.tls!r}")
    if settings.security.trusted_authserv_id:
        measures.append("Senders authenticated by the MTA's Authentication-Results "
                        f"({settings.security.trusted_authserv_id}) before any mail is filed")
    return [*measures, *settings.privacy.security_measures]


def record(settings: Settings) -> dict[str, Any]:
    """The Art. 30 record of the support desk, as plain data."""
    privacy = settings.privacy
    return {
        "processing": "Customer support by email",
        "controller": {"name": privacy.controller, "address": privacy.controller_address},
        "dpo": {"email": privacy.dpo_email},
        "purposes": [
            "Opening and following up the support requests of the people whom a customer "
            "company authorised",
            "Security of the support desk: quarantine of mail from unknown senders, access "
            "log, limits on automatic mail",
            "Handling the data protection rights of the people concerned",
        ],
        "legal_basis": "Legitimate interest (GDPR Art. 6(1)(f)) of "
                       f"{privacy.controller} in performing its support contracts",
        "data_subjects": [
            "People authorised by a customer company to open support requests",
            "Senders without an account, whose mail is quarantined",
        ],
        "categories": [
            "Identity: first and last name",
            "Business contact details: email address (mandatory), phone number",
            "Support requests: tickets, messages, attachments and the original mails",
            "Technical logs: mails received and sent, and the access log",
            "Rights exercised: restriction, objection, post-mortem directive, rights requests",
        ],
        "source": "The person's company when it asks for the account; then the person "
                  "themselves, by mail",
        "recipients": [
            f"The support team of {privacy.controller}",
            f"Staff of {privacy.us_entity}, only for companies that subscribe to after-hours "
            "support",
            f"The Data Protection Officer ({privacy.dpo_email}), for rights requests",
            *(f"Processor: {name}" for name in privacy.processors),
        ],
        "transfers": [
            {
                "recipient": privacy.us_entity,
                "country": "United States",
                "condition": "only for companies that subscribe to after-hours support",
                "safeguard": "European Commission Standard Contractual Clauses (GDPR "
                             "Art. 46(2)(c)); a copy from the DPO",
            }
        ],
        "retention": [
            {"data": "Accounts and all their tickets, messages, attachments and mails",
             "period": f"{privacy.retention_years} years after the account's deactivation"},
            {"data": "Quarantined mail from senders without an account",
             "period": f"{privacy.quarantine_days} days"},
            {"data": "Audit events, the access log included",
             "period": f"{privacy.audit_days} days"},
        ],
        "security_measures": _security_measures(settings),
    }


def _list(items: list[str]) -> list[str]:
    return [f"- {item}" for item in items]


def to_markdown(data: dict[str, Any]) -> str:
    """The record as a Markdown document."""
    controller, dpo = data["controller"], data["dpo"]
    lines = [
        f"# Record of processing activities: {data['processing']}", "",
        "## Controller", "", f"{controller['name']}, {controller['address']}", "",
        "## Data Protection Officer", "", dpo["email"], "",
        "## Purposes", "", *_list(data["purposes"]), "",
        "## Legal basis", "", data["legal_basis"], "",
        "## Data subjects", "", *_list(data["data_subjects"]), "",
        "## Categories of personal data", "", *_list(data["categories"]), "",
        "## Source of the data", "", data["source"], "",
        "## Recipients", "", *_list(data["recipients"]), "",
        "## Transfers outside the European Union", "",
        *(f"- {t['recipient']} ({t['country']}), {t['condition']}; safeguard: {t['safeguard']}"
          for t in data["transfers"]), "",
        "## Retention", "",
        *(f"- {r['data']}: {r['period']}" for r in data["retention"]), "",
        "## Security measures", "", *_list(data["security_measures"]),
    ]
    return "\n".join(lines) + "\n"
