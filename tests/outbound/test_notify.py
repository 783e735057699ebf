"""Notify stage: mails rendered from the templates and enqueued in the caller's transaction."""

from __future__ import annotations

import email
import email.policy
import html
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
import sqlalchemy as sa
from outgoing import composed
from sqlmodel import Session, func, select

from maildesk.config import DeskSettings, PrivacySettings, Settings
from maildesk.mail.quotes import REPLY_ABOVE_MARKER
from maildesk.outbound.notify import MAX_REFERENCES, Notifier, default_templates_dir
from maildesk.signing import ReplyKey, ReplyKeyring, read_reply_address, verify_reply_token
from maildesk.store.models import Account, Agent, Attachment, Company, Message, Outbox, Ticket

REPO = Path(__file__).resolve().parents[2]
DESK_ADDRESS = "support@desk.example"
DESK_NAME = "Neocase Software Support"
KEY = ReplyKeyring(ReplyKey("a", b"a-test-reply-key"))
# A phrase that only the customer's own mail contains: it must never be echoed back to them.
SECRET = "zanzibar-ostrich-4711"
ORIGINAL_ID = "<orig-1@facade.example>"
LOCALES = ["fr", "en"]

FOOTER = {
    "fr": [
        "Neocase Software",
        "91 boulevard National, 92250 La Garenne-Colombes, France",
        "intérêt légitime",
        "contrat",
        "7 ans après la désactivation de votre compte",
        "accès",
        "rectification",
        "effacement",
        "limitation",
        "opposition",
        "si vous résidez en France",
        "après votre mort",
        "contactez le support",
        "dpo@neocasesoftware.com",
        "CNIL",
        "https://www.cnil.fr/fr/plaintes",
    ],
    "en": [
        "Neocase Software",
        "91 boulevard National, 92250 La Garenne-Colombes, France",
        "legitimate interest",
        "contract",
        "7 years after your account is deactivated",
        "access",
        "rectification",
        "erasure",
        "restriction",
        "objection",
        "if you live in France",
        "after your death",
        "contact the support team",
        "dpo@neocasesoftware.com",
        "CNIL",
        "https://www.cnil.fr/fr/plaintes",
    ],
}
ASK_THE_DPO = {"fr": "sur simple demande auprès du DPO", "en": "ask the DPO"}
NOTICE_URL = "https://www.neocasesoftware.com/privacy-support"


def make_settings(locale: str = "fr", notice_url: str = "") -> Settings:
    return Settings(
        desk=DeskSettings(name=DESK_NAME, address=DESK_ADDRESS, locale=locale),  # type: ignore[arg-type]
        privacy=PrivacySettings(notice_url=notice_url, retention_years=7),
    )


@dataclass
class World:
    company: Company
    account: Account
    alice: Agent
    bob: Agent
    ticket: Ticket
    message: Message


@pytest.fixture
def session(engine: sa.Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session
        session.rollback()


def make_world(session: Session, locale: str = "fr", after_hours: bool = False) -> World:
    company = Company(name="Établissements Façade & Fils", after_hours=after_hours)
    session.add(company)
    session.flush()
    assert company.id is not None
    account = Account(
        email="claire.dubois@facade.example",
        name="Claire Dubois-Françoise",
        phone="+33 1 23 45 67 89",
        company_id=company.id,
        locale=locale,
        # The welcome with the full notice went out when the account was created: later mails
        # carry the short footer (tests/privacy/test_notice.py covers the first mail).
        notice_sent_at=datetime.now(UTC),
    )
    alice = Agent(email="alice.martin@neocase.example", name="Alice Martin", region="EU")
    bob = Agent(email="bob.smith@neocase.example", name="Bob Smith", region="US")
    session.add_all([account, alice, bob])
    session.flush()
    assert account.id is not None
    ticket = Ticket(
        subject=f"Reçu bloqué à 120 € {SECRET}", account_id=account.id, company_id=company.id
    )
    session.add(ticket)
    session.flush()
    assert ticket.id is not None
    message = Message(
        ticket_id=ticket.id,
        direction="in",
        author_kind="customer",
        author_email=account.email,
        author_name=account.name,
        account_id=account.id,
        message_id=ORIGINAL_ID,
        text=f"Bonjour,\nLe reçu de 120 € ne s'affiche plus ({SECRET}).\n"
        "<script>alert('x')</script>\nCordialement, Claire",
        created_at=datetime.now(UTC) - timedelta(minutes=5),
    )
    session.add(message)
    session.flush()
    assert message.id is not None
    session.add(
        Attachment(
            message_id=message.id, sha256="0" * 64, filename="capture d'écran.png",
            content_type="image/png", size=10,
        )
    )
    session.add(
        Attachment(
            message_id=message.id, sha256="1" * 64, filename="journal_ç.log",
            content_type="text/plain", size=10,
        )
    )
    session.flush()
    return World(company, account, alice, bob, ticket, message)


def parse(outbox: Outbox) -> EmailMessage:
    parsed = email.message_from_bytes(composed(outbox), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def parts(msg: EmailMessage) -> tuple[str, str]:
    assert msg.get_content_type() == "multipart/alternative"
    text_part = msg.get_body(("plain",))
    html_part = msg.get_body(("html",))
    assert text_part is not None and html_part is not None
    assert text_part.get_content_charset() == "utf-8"
    assert html_part.get_content_charset() == "utf-8"
    return (
        text_part.get_content().replace("\r\n", "\n"),
        html_part.get_content().replace("\r\n", "\n"),
    )


def assert_footer(msg: EmailMessage, locale: str, notice_url: str = "") -> None:
    text, markup = parts(msg)
    assert "\n-- \n" in text, "the footer sits below a signature separator"
    footer = text.split("\n-- \n", 1)[1].strip()
    assert 5 <= len(footer.splitlines()) <= 8
    html_footer = html.unescape(markup.split("<hr", 1)[1])
    for needle in FOOTER[locale]:
        assert needle in footer, needle
        assert needle in html_footer, needle
    if notice_url:
        assert notice_url in footer and notice_url in html_footer
        assert ASK_THE_DPO[locale] not in footer
    else:
        assert ASK_THE_DPO[locale] in footer and ASK_THE_DPO[locale] in html_footer


def assert_signed_for(msg: EmailMessage, ticket_id: int, principal: str) -> None:
    reply_to = msg["Reply-To"].addresses[0].addr_spec
    token = read_reply_address(DESK_ADDRESS, reply_to)
    assert token is not None and token.ticket_id == ticket_id
    today = datetime.now(UTC).date()
    assert verify_reply_token(KEY, token, principal=principal, epoch=0, today=today)
    assert not verify_reply_token(KEY, token, principal="account:999", epoch=0, today=today)


def assert_from_desk(msg: EmailMessage, display_name: str = DESK_NAME) -> None:
    sender = msg["From"].addresses[0]
    assert sender.addr_spec == DESK_ADDRESS
    assert sender.display_name == display_name


def assert_common(msg: EmailMessage, locale: str, to: str) -> None:
    assert msg["Message-ID"].endswith("@desk.example>")
    assert msg["Date"].datetime is not None
    assert msg["To"].addresses[0].addr_spec == to
    assert msg["Content-Language"] == locale
    assert msg["MIME-Version"] == "1.0"


@pytest.mark.parametrize("locale", LOCALES)
def test_acknowledgement(session: Session, locale: str) -> None:
    world = make_world(session, locale=locale)
    outbox = Notifier(make_settings(), KEY).acknowledge(
        session, ticket=world.ticket, account=world.account, message=world.message
    )
    # Queued in the caller's transaction: the next query sees it.
    assert session.exec(select(Outbox)).all() == [outbox] and outbox.kind == "acknowledgement"
    assert outbox.ticket_id == world.ticket.id
    assert outbox.mail_from == f"support+bounce-{outbox.verp}@desk.example" and outbox.verp
    assert json.loads(outbox.recipients) == [world.account.email]
    msg = parse(outbox)
    assert outbox.message_id == msg["Message-ID"]
    assert_common(msg, locale, world.account.email)
    assert_from_desk(msg)
    expected = {"fr": "Votre demande a bien été enregistrée", "en": "We have received your request"}
    assert msg["Subject"] == f"[#{world.ticket.id}] {expected[locale]}"
    assert msg["In-Reply-To"] == ORIGINAL_ID
    assert msg["References"] == ORIGINAL_ID
    assert_signed_for(msg, world.ticket.id or 0, f"account:{world.account.id}")
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["X-Auto-Response-Suppress"] == "All"
    text, markup = parts(msg)
    assert text.splitlines()[0] == REPLY_ABOVE_MARKER
    assert REPLY_ABOVE_MARKER in html.unescape(markup)
    assert f"[#{world.ticket.id}]" in text
    assert "Claire Dubois-Françoise" in text
    assert_footer(msg, locale)
    # Nothing of the customer's mail comes back: neither its subject nor its text.
    for blob in (composed(outbox).decode("ascii"), str(msg), text, markup):
        assert SECRET not in blob
        assert "120 €" not in blob and "script" not in blob


@pytest.mark.parametrize("locale", LOCALES)
def test_unknown_sender(session: Session, locale: str) -> None:
    outbox = Notifier(make_settings(), KEY).answer_unknown_sender(
        session, address="stranger@nowhere.example", locale=locale
    )
    assert outbox.kind == "unknown_sender" and outbox.ticket_id is None
    assert json.loads(outbox.recipients) == ["stranger@nowhere.example"]
    msg = parse(outbox)
    assert_common(msg, locale, "stranger@nowhere.example")
    assert_from_desk(msg)
    assert "[#" not in msg["Subject"]
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["In-Reply-To"] is None and msg["References"] is None
    text, markup = parts(msg)
    administrator = {"fr": "administrateur de votre société", "en": "company's administrator"}
    assert administrator[locale] in text and administrator[locale] in html.unescape(markup)
    # It cannot be replied to as a ticket, so it carries no reply marker.
    assert REPLY_ABOVE_MARKER not in text
    # A stranger's footer says what is kept of their mail and for how long, and their rights;
    # never the account wording about a deactivation they never had.
    footer = text.split("\n-- \n", 1)[1]
    kept = {"fr": "pendant 30 jours au plus", "en": "30 days"}
    assert kept[locale] in footer and "dpo@" in footer
    assert "désactivation" not in footer and "deactivation" not in footer
    assert SECRET not in composed(outbox).decode("ascii")


def test_unknown_sender_without_locale_uses_the_desks(session: Session) -> None:
    outbox = Notifier(make_settings(locale="en"), KEY).answer_unknown_sender(
        session, address="stranger@nowhere.example", locale=None
    )
    assert parse(outbox)["Content-Language"] == "en"


@pytest.mark.parametrize("locale", LOCALES)
def test_new_ticket_to_agents(session: Session, locale: str) -> None:
    world = make_world(session, after_hours=True)
    sent = Notifier(make_settings(locale=locale), KEY).tell_agents_new_ticket(
        session, ticket=world.ticket, account=world.account, company=world.company,
        message=world.message, agents=[world.alice, world.bob],
    )
    assert [o.kind for o in sent] == ["new_ticket", "new_ticket"]
    assert len({o.message_id for o in sent}) == 2
    # The US team reads English; the others get the desk's language.
    for outbox, agent, language in zip(sent, [world.alice, world.bob], [locale, "en"], strict=True):
        assert json.loads(outbox.recipients) == [agent.email]
        msg = parse(outbox)
        assert_common(msg, language, agent.email)
        assert_from_desk(msg)
        assert msg["Subject"].startswith(f"[#{world.ticket.id}] ")
        assert f"Reçu bloqué à 120 € {SECRET}" in msg["Subject"]
        assert msg["In-Reply-To"] == ORIGINAL_ID
        assert ORIGINAL_ID in msg["References"].split()
        assert_signed_for(msg, world.ticket.id or 0, f"agent:{agent.id}")
        assert msg["Auto-Submitted"] == "auto-generated"
        assert msg["X-Auto-Response-Suppress"] == "All"
        text, markup = parts(msg)
        assert text.splitlines()[0] == REPLY_ABOVE_MARKER
        assert REPLY_ABOVE_MARKER in html.unescape(markup)
        for needle in (
            "Claire Dubois-Françoise", "claire.dubois@facade.example", "+33 1 23 45 67 89",
            "Établissements Façade & Fils", "Le reçu de 120 € ne s'affiche plus",
            "capture d'écran.png", "journal_ç.log", f"{agent.name} via {DESK_NAME}",
        ):
            assert needle in text, needle
            assert needle in html.unescape(markup), needle
        after_hours = {"fr": "Assistance hors horaires : oui", "en": "After-hours support: yes"}
        assert after_hours[language] in text
        # Agents are staff and see the text as written; the HTML part shows it, escaped.
        assert "<script>alert('x')</script>" in text
        assert "<script>" not in markup
        assert "&lt;script&gt;" in markup
        assert "Établissements Façade &amp; Fils" in markup
        # Agents' mails carry no privacy footer: they go to staff, not to the data subject.
        assert "\n-- \n" not in text


def test_us_agents_are_refused_without_after_hours(session: Session) -> None:
    world = make_world(session, after_hours=False)
    with pytest.raises(ValueError, match="after-hours"):
        Notifier(make_settings(), KEY).tell_agents_new_ticket(
            session, ticket=world.ticket, account=world.account, company=world.company,
            message=world.message, agents=[world.alice, world.bob],
        )


@pytest.mark.parametrize("locale", LOCALES)
def test_followup_threads_with_the_whole_ticket(session: Session, locale: str) -> None:
    world = make_world(session)
    notifier = Notifier(make_settings(locale=locale), KEY)
    ack = notifier.acknowledge(
        session, ticket=world.ticket, account=world.account, message=world.message
    )
    followup = Message(
        ticket_id=world.ticket.id or 0, direction="in", author_kind="customer",
        author_email=world.account.email, account_id=world.account.id,
        message_id="<followup-2@facade.example>", in_reply_to=ack.message_id,
        text="Voici le reçu en pièce jointe.",
    )
    session.add(followup)
    session.flush()
    [outbox] = notifier.tell_agents_followup(
        session, ticket=world.ticket, account=world.account, company=world.company,
        message=followup, agents=[world.alice],
    )
    assert outbox.kind == "followup"
    msg = parse(outbox)
    assert msg["Subject"] == f"Re: Reçu bloqué à 120 € {SECRET} [#{world.ticket.id}]"
    assert msg["In-Reply-To"] == "<followup-2@facade.example>"
    assert msg["References"].split() == [
        ORIGINAL_ID, ack.message_id, "<followup-2@facade.example>"
    ]
    assert msg["Auto-Submitted"] == "auto-generated"
    assert_signed_for(msg, world.ticket.id or 0, f"agent:{world.alice.id}")
    text, _ = parts(msg)
    assert "Voici le reçu en pièce jointe." in text
    assert {"fr": "Pièces jointes : aucune", "en": "Attachments: none"}[locale] in text


def test_references_are_capped_and_keep_the_first_and_the_parent(session: Session) -> None:
    world = make_world(session)
    start = datetime.now(UTC)
    for n in range(15):
        session.add(
            Message(
                ticket_id=world.ticket.id or 0, direction="in", author_kind="customer",
                author_email=world.account.email, message_id=f"<m{n}@facade.example>",
                created_at=start + timedelta(seconds=n),
            )
        )
    # A stored id that could smuggle a header line is never repeated.
    session.add(
        Message(
            ticket_id=world.ticket.id or 0, direction="in", author_kind="customer",
            author_email=world.account.email, message_id="<bad\r\nBcc: x@y.example>",
            created_at=start + timedelta(seconds=20),
        )
    )
    long_id = "<DB9PR07MB7324F1E5D2C6E3B3B5A7E3A2D4A92A@DB9PR07MB7324.eurprd07.prod.outlook.com>"
    parent = Message(
        ticket_id=world.ticket.id or 0, direction="in", author_kind="customer",
        author_email=world.account.email, message_id=long_id,
        created_at=start + timedelta(seconds=30),
    )
    session.add(parent)
    session.flush()
    [outbox] = Notifier(make_settings(), KEY).tell_agents_followup(
        session, ticket=world.ticket, account=world.account, company=world.company,
        message=parent, agents=[world.alice],
    )
    msg = parse(outbox)
    references = msg["References"].split()
    assert len(references) == MAX_REFERENCES
    assert references[0] == ORIGINAL_ID
    assert references[-1] == long_id == msg["In-Reply-To"]
    assert references[-2] == "<m14@facade.example>"
    # Long Outlook-style ids stay plain ids, never RFC 2047 encoded words.
    assert long_id.encode() in composed(outbox)
    assert b"Bcc" not in composed(outbox)


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("notice_url", ["", NOTICE_URL])
def test_relay_answer(session: Session, locale: str, notice_url: str) -> None:
    world = make_world(session, locale=locale, after_hours=True)
    answer = Message(
        ticket_id=world.ticket.id or 0, direction="in", author_kind="agent",
        author_email=world.alice.email, agent_id=world.alice.id,
        message_id="<answer-3@neocase.example>",
        text="Bonjour Claire,\nLe reçu est corrigé ; le montant de 120 € s'affiche à nouveau.",
    )
    session.add(answer)
    session.flush()
    outbox = Notifier(make_settings(notice_url=notice_url), KEY).relay_answer(
        session, ticket=world.ticket, account=world.account, agent=world.alice, message=answer
    )
    assert outbox.kind == "answer"
    assert json.loads(outbox.recipients) == [world.account.email]
    msg = parse(outbox)
    assert_common(msg, locale, world.account.email)
    assert_from_desk(msg, f"Alice Martin via {DESK_NAME}")
    assert msg["Subject"] == f"Re: Reçu bloqué à 120 € {SECRET} [#{world.ticket.id}]"
    assert msg["In-Reply-To"] == "<answer-3@neocase.example>"
    assert msg["References"].split()[0] == ORIGINAL_ID
    assert_signed_for(msg, world.ticket.id or 0, f"account:{world.account.id}")
    # A person's answer: no automatic-mail headers, so that the customer's client treats it
    # as any other mail.
    assert msg["Auto-Submitted"] is None and msg["X-Auto-Response-Suppress"] is None
    text, markup = parts(msg)
    assert text.splitlines()[0] == REPLY_ABOVE_MARKER
    assert "le montant de 120 € s'affiche à nouveau" in text
    assert "le montant de 120 € s'affiche à nouveau" in html.unescape(markup)
    assert_footer(msg, locale, notice_url)
    # The company has after-hours support, so the footer tells of the US transfer.
    assert "Boston" in text.split("\n-- \n", 1)[1]
    assert world.alice.email not in composed(outbox).decode("ascii")


def test_the_us_transfer_is_only_mentioned_to_those_it_concerns(session: Session) -> None:
    world = make_world(session, after_hours=False)
    outbox = Notifier(make_settings(), KEY).acknowledge(
        session, ticket=world.ticket, account=world.account, message=world.message
    )
    text, markup = parts(parse(outbox))
    assert "Boston" not in text and "Boston" not in markup


def test_an_unknown_account_locale_falls_back_to_the_desks(session: Session) -> None:
    world = make_world(session, locale="de")
    outbox = Notifier(make_settings(locale="en"), KEY).acknowledge(
        session, ticket=world.ticket, account=world.account, message=world.message
    )
    assert parse(outbox)["Content-Language"] == "en"


def test_nothing_is_committed_by_the_notifier(engine: sa.Engine) -> None:
    notifier = Notifier(make_settings(), KEY)
    with Session(engine) as session:
        world = make_world(session, after_hours=True)
        notifier.acknowledge(
            session, ticket=world.ticket, account=world.account, message=world.message
        )
        notifier.tell_agents_new_ticket(
            session, ticket=world.ticket, account=world.account, company=world.company,
            message=world.message, agents=[world.alice, world.bob],
        )
        notifier.relay_answer(
            session, ticket=world.ticket, account=world.account, agent=world.alice,
            message=world.message,
        )
        notifier.answer_unknown_sender(session, address="stranger@nowhere.example", locale="fr")
        assert session.exec(select(func.count()).select_from(Outbox)).one() == 5
        session.rollback()
    with Session(engine) as session:
        assert session.exec(select(func.count()).select_from(Outbox)).one() == 0
        assert session.exec(select(func.count()).select_from(Ticket)).one() == 0


def test_templates_exist_for_every_mail_in_both_locales() -> None:
    assert default_templates_dir() == REPO / "templates"
    names = ["acknowledgement", "new_ticket", "followup", "answer", "unknown_sender"]
    for locale in LOCALES:
        for name in names:
            for suffix in ("subject.j2", "txt.j2", "html.j2"):
                assert (REPO / "templates" / locale / f"{name}.{suffix}").is_file()
    assert sorted(p.name for p in (REPO / "templates" / "fr").iterdir()) == sorted(
        p.name for p in (REPO / "templates" / "en").iterdir()
    )


@pytest.mark.parametrize("address", ["", "no-domain", "a@b.example\r\nBcc: c@d.example"])
def test_an_unusable_address_gets_no_answer(session: Session, address: str) -> None:
    with pytest.raises(ValueError, match="cannot send mail"):
        Notifier(make_settings(), KEY).answer_unknown_sender(session, address=address, locale="fr")
    assert session.exec(select(func.count()).select_from(Outbox)).one() == 0


def test_an_installed_package_uses_its_own_templates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site-packages" / "maildesk"
    # An unrelated top-level templates/ in site-packages must not be mistaken for ours.
    (tmp_path / "site-packages" / "templates").mkdir(parents=True)
    monkeypatch.setattr("maildesk.outbound.notify._PACKAGE_DIR", package)
    assert default_templates_dir() == package / "templates"


def test_a_templates_dir_can_be_given(session: Session, tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    templates = {"subject.j2": "Hi", "txt.j2": "To {{ address }}", "html.j2": "<p>x</p>"}
    for suffix, body in templates.items():
        (tmp_path / "en" / f"unknown_sender.{suffix}").write_text(body, encoding="utf-8")
    outbox = Notifier(make_settings(), KEY, templates_dir=tmp_path).answer_unknown_sender(
        session, address="stranger@nowhere.example", locale="en"
    )
    msg = parse(outbox)
    assert msg["Subject"] == "Hi"
    assert parts(msg)[0] == "To stranger@nowhere.example\n"
