"""Safe by mail, end to end: `maildesk run` with a trusted authserv-id, tried as an attacker."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from e2e import AGENT, CUSTOMER, DESK, US_AGENT, RunningDesk, customer_mail, running_desk
from rig.smtp import RecordedMail, RecordingSMTPServer

TRUSTED = "mx.desk.example"
PASS_CUSTOMER = (
    f"{TRUSTED}; spf=pass smtp.mailfrom={CUSTOMER}; dmarc=pass header.from=client.example"
)
NO_RESULTS = f"agent mail not authenticated: no Authentication-Results from {TRUSTED}"
PASS_AGENT = f"{TRUSTED}; dkim=pass header.d=vendor.example; dmarc=pass header.from=vendor.example"


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"


def send(desk: RunningDesk, mail: EmailMessage) -> None:
    with smtplib.SMTP("127.0.0.1", desk.listener_port) as client:
        client.send_message(mail)


def agent_mail(
    to: str, *results: str, sender: str = AGENT, text: str = "Voici la réponse."
) -> EmailMessage:
    mail = customer_mail(subject="Re: [#1] Export PDF en erreur", text=text, sender=sender, to=to)
    del mail["From"]
    mail["From"] = f"Alice Martin <{sender}>"
    for value in results:
        mail["Authentication-Results"] = value
    return mail


def to_customer(mail: RecordedMail) -> bool:
    return mail.rcpt_tos == [CUSTOMER]


def reply_to_of(mail: RecordedMail) -> str:
    parsed = message_from_bytes(mail.raw, policy=policy.default)
    return str(parsed["Reply-To"].addresses[0].addr_spec)


def tamper(address: str) -> str:
    local, _, domain = address.partition("@")
    last = local[-1]
    return local[:-1] + ("0" if last != "0" else "1") + "@" + domain


@pytest.fixture
def desk_with_a_ticket(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> Iterator[tuple[RunningDesk, dict[str, str]]]:
    """A running desk that trusts mx.desk.example, with ticket #1 and its reply addresses."""
    with running_desk(tmp_path, sqlite_url(tmp_path), imap=None, smtp=smtp_server,
                      after_hours=True, security=f'trusted_authserv_id = "{TRUSTED}"\n') as desk:
        send(desk, customer_mail(Authentication_Results=PASS_CUSTOMER))
        mails = smtp_server.wait_for(count=3, timeout=30)
        addresses = {m.rcpt_tos[0]: reply_to_of(m) for m in mails}
        assert set(addresses) == {CUSTOMER, AGENT, US_AGENT}
        smtp_server.clear()
        yield desk, addresses


def test_nobody_acts_as_an_agent_without_proof(
    desk_with_a_ticket: tuple[RunningDesk, dict[str, str]], smtp_server: RecordingSMTPServer
) -> None:
    desk, reply = desk_with_a_ticket
    alice, bob, claire = reply[AGENT], reply[US_AGENT], reply[CUSTOMER]
    attempts = [
        (agent_mail(alice, f"{TRUSTED}; dmarc=fail header.from=vendor.example"),
         "agent mail not authenticated: dmarc=fail"),
        (agent_mail(alice, "mx.other.example; dmarc=pass header.from=vendor.example"),
         NO_RESULTS),
        (agent_mail(alice), NO_RESULTS),
        (agent_mail(alice, f"{TRUSTED}; spf=pass smtp.mailfrom={AGENT}"),
         "agent mail not authenticated: sender not authenticated (no DMARC pass or aligned "
         "DKIM pass)"),
        (agent_mail(alice, f"{TRUSTED}; dkim=pass header.d=vendor.example.evil.example"),
         "agent mail not authenticated: sender not authenticated (no DMARC pass or aligned "
         "DKIM pass)"),
        # The MTA's own header is the topmost; a forged pass below it counts for nothing.
        (agent_mail(alice, f"{TRUSTED}; dmarc=fail header.from=vendor.example", PASS_AGENT),
         "agent mail not authenticated: dmarc=fail"),
        (agent_mail(tamper(alice), PASS_AGENT), "agent mail without a signed reply address"),
        (agent_mail(bob, PASS_AGENT), "agent mail without a signed reply address"),
        (agent_mail(claire, PASS_AGENT), "agent mail without a signed reply address"),
        (agent_mail(alice.replace("+t1-", "+t2-"), PASS_AGENT),
         "agent mail without a signed reply address"),
    ]
    for mail, _reason in attempts:
        send(desk, mail)
    inbound = desk.wait_for_inbound(1 + len(attempts))
    reasons = [row.reason for row in sorted(inbound, key=lambda r: r.id or 0)][1:]
    assert reasons == [reason for _mail, reason in attempts]
    assert len(desk.messages(1)) == 1
    # The real agent hears of the mails in their name; the customer hears nothing.
    notices = smtp_server.wait_for(count=len(attempts), timeout=30,
                                   predicate=lambda m: m.rcpt_tos == [AGENT])
    # Alice is in the EU team, so she reads the desk's language.
    assert {str(m.message["Subject"]) for m in notices} == {"Votre message n'a pas été traité"}
    assert not [m for m in smtp_server.mails if to_customer(m)]

    # The positive control: the same agent, authenticated, through their own address.
    send(desk, agent_mail(alice, PASS_AGENT))
    [answer] = smtp_server.wait_for(count=1, timeout=30, predicate=to_customer)
    assert "Voici la réponse." in answer.message.get_body(("plain",)).get_content()
    assert b"support+t" not in answer.raw.split(b"\r\n\r\n", 1)[1]
    assert [m.author_kind for m in desk.messages(1)] == ["customer", "agent"]


def test_a_customer_unauthenticated_by_the_trusted_mta_is_held(
    desk_with_a_ticket: tuple[RunningDesk, dict[str, str]], smtp_server: RecordingSMTPServer
) -> None:
    desk, _reply = desk_with_a_ticket
    failed = f"{TRUSTED}; dmarc=fail header.from=client.example"
    send(desk, customer_mail(subject="Nouvelle demande", Authentication_Results=failed))
    [_first, second] = sorted(desk.wait_for_inbound(2), key=lambda r: r.id or 0)
    assert (second.outcome, second.reason) == ("quarantined", "dmarc=fail")
    assert len(desk.tickets()) == 1
    assert DESK not in [m.rcpt_tos[0] for m in smtp_server.mails]
