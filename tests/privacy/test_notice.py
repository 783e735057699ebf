"""The full privacy notice reaches every person: with the welcome, else with their first mail.

GDPR Art. 14: account data come from the person's company, so each person gets the full
notice within a month, and at the latest with the first mail the desk sends them.
"""

from __future__ import annotations

import html
import json
import re
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
import sqlalchemy as sa
from e2e import CUSTOMER, customer_mail
from outgoing import composed
from sqlmodel import Session, col, select
from support_fixtures import Desk

from maildesk.config import DeskSettings, PrivacySettings, Settings
from maildesk.mail.message import Delivery
from maildesk.pipeline import Pipeline
from maildesk.privacy import notice
from maildesk.store import database, directory
from maildesk.store.models import Account, Outbox

SMTP = Delivery(source="smtp", envelope_from=CUSTOMER)
DESK = "support@desk.example"

# Every element the notice must give (Art. 13 and 14), as the default config words it.
FULL_NOTICE = {
    "fr": [
        "Neocase Software, 91 boulevard National, 92250 La Garenne-Colombes, France, est "
        "responsable du traitement",
        "créer et suivre vos demandes d'assistance",
        "intérêt légitime de Neocase Software à exécuter ses obligations contractuelles",
        "nom et prénom", "email professionnel", "coordonnées professionnelles",
        "vos demandes d'assistance (tickets), vos messages et leurs pièces jointes",
        "fournies par votre société lorsqu'elle demande la création de votre compte",
        "L'email est obligatoire : il vous identifie auprès du support et reçoit les "
        "notifications",
        "service support de Neocase Software", "prestataires techniques (sous-traitants)",
        "Neocase Software Inc., near Boston, United States",
        "clauses contractuelles types de la Commission européenne",
        "obtenir une copie de ces clauses auprès de notre délégué à la protection des données",
        "jusqu'à 5 ans après la désactivation de votre compte",
        "(droit d'accès)", "(droit de rectification)", "(droit à l'effacement)",
        "(droit à la limitation)", "définir des directives sur le sort de vos données après "
        "votre mort",
        "Vous pouvez à tout moment vous opposer à l'utilisation de vos données",
        "Écrivez au support, support@desk.example, ou directement à notre délégué à la "
        "protection des données (DPO)",
        "dpo@neocasesoftware.com",
        "réclamation à l'autorité de contrôle (CNIL : https://www.cnil.fr/fr/plaintes)",
    ],
    "en": [
        "Neocase Software, 91 boulevard National, 92250 La Garenne-Colombes, France, is the "
        "controller",
        "open and follow up your support requests",
        "legitimate interest of Neocase Software in performing its contractual obligations",
        "first and last name", "business email", "business contact details",
        "your support requests (tickets), your messages and their attachments",
        "provided by your company when it asks for your account to be created",
        "Your email is mandatory: it identifies you to the support desk and receives the "
        "notifications",
        "support team of Neocase Software", "technical providers (processors)",
        "Neocase Software Inc., near Boston, United States",
        "European Commission's Standard Contractual Clauses",
        "obtain a copy of these clauses from our Data Protection Officer",
        "up to 5 years after your account is deactivated",
        "(right of access)", "(right to rectification)", "(right to erasure)",
        "(right to restriction)", "give directives on what happens to your data after your "
        "death",
        "You may object at any time to the use of your data",
        "Write to the support team, support@desk.example, or directly to our Data Protection "
        "Officer (DPO)",
        "dpo@neocasesoftware.com",
        "complaint with the supervisory authority (CNIL: https://www.cnil.fr/fr/plaintes)",
    ],
}
# The right to object stands on its own, under its own heading (Art. 21(4)).
OBJECTION_HEADING = {"fr": "Droit d'opposition", "en": "Right to object"}
# The short footer of later mails points to the full notice.
POINTER = {"fr": "Notice d'information complète : dans notre premier message",
           "en": "Full privacy notice: in our first message to you"}


def _settings(tmp_path: Path, **privacy: object) -> Settings:
    return Settings(desk=DeskSettings(address=DESK, state_dir=tmp_path / "state"),
                    privacy=PrivacySettings(**privacy))  # type: ignore[arg-type]


def _parts(raw: bytes) -> tuple[EmailMessage, str, str]:
    msg = message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    text, markup = msg.get_body(("plain",)), msg.get_body(("html",))
    assert text is not None and markup is not None
    # The HTML part as a reader sees it: its text, without the tags.
    visible = html.unescape(re.sub(r"<[^>]*>", "", markup.get_content()))
    return msg, text.get_content().replace("\r\n", "\n"), " ".join(visible.split())


def _outbox(engine: sa.Engine, kind: str) -> list[Outbox]:
    with Session(engine) as session:
        return list(session.exec(select(Outbox).where(Outbox.kind == kind)
                                 .order_by(col(Outbox.id))))


def assert_full_notice(raw: bytes, locale: str) -> None:
    msg, text, markup = _parts(raw)
    assert msg["Content-Language"] == locale
    for needle in FULL_NOTICE[locale]:
        assert needle in text, needle
        assert needle in markup, needle
    assert f"\n{OBJECTION_HEADING[locale]}\n" in text
    raw_html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert f">{OBJECTION_HEADING[locale]}</h3>" in html.unescape(raw_html)


@pytest.mark.parametrize("locale", ["fr", "en"])
def test_the_welcome_to_a_new_account_carries_the_full_notice(
    engine: sa.Engine, tmp_path: Path, locale: str
) -> None:
    settings = _settings(tmp_path)
    with database.session_scope(engine) as session:
        directory.add_company(session, name="Client SA", after_hours=False, actor="t")
        account = directory.add_account(session, email=CUSTOMER, name="Claire Dupont",
                                        company="Client SA", locale=locale, actor="t")
        [queued] = notice.welcome(session, settings, [account])
        # An account that had its notice gets no second welcome.
        assert notice.welcome(session, settings, [account]) == []
    [welcome] = _outbox(engine, "welcome")
    assert welcome.id == queued.id and json.loads(welcome.recipients) == [CUSTOMER]
    assert_full_notice(composed(welcome), locale)
    msg, text, _ = _parts(composed(welcome))
    assert "Claire Dupont" in text and "Client SA" in text
    # Not a ticket's mail: no reply address that could be taken for one.
    assert msg["Reply-To"] is None and msg["Auto-Submitted"] == "auto-generated"
    with Session(engine) as session:
        stored = session.exec(select(Account)).one()
        assert stored.notice_sent_at is not None


def test_another_vendor_adopts_the_notice_by_config(engine: sa.Engine, tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, controller="Acme Support GmbH", controller_address="1 Hauptstraße, Berlin",
        dpo_email="privacy@acme.example", retention_years=3, us_entity="Acme Inc., Texas",
        authority="BfDI", authority_url="https://www.bfdi.bund.de",
        processors=("Hetzner Online GmbH (hosting)",),
    )
    with database.session_scope(engine) as session:
        directory.add_company(session, name="Kunde AG", after_hours=True, actor="t")
        account = directory.add_account(session, email=CUSTOMER, name="Claire",
                                        company="Kunde AG", locale="en", actor="t")
        notice.welcome(session, settings, [account])
    [welcome] = _outbox(engine, "welcome")
    _, text, markup = _parts(composed(welcome))
    for needle in ("Acme Support GmbH, 1 Hauptstraße, Berlin, is the controller",
                   "privacy@acme.example", "up to 3 years after", "Acme Inc., Texas",
                   "Hetzner Online GmbH (hosting)", "(BfDI: https://www.bfdi.bund.de)",
                   "Your company subscribes to it."):
        assert needle in text and needle in markup, needle
    assert "Neocase" not in composed(welcome).decode("ascii") and "CNIL" not in text


def test_accounts_add_and_import_queue_a_welcome_in_each_persons_language(desk: Desk) -> None:
    assert desk.cli("companies", "add", "Client SA").code == 0
    added = desk.cli("accounts", "add", "--email", CUSTOMER, "--name", "Claire Dupont",
                     "--company", "Client SA")
    assert added.code == 0, added.err
    csv = desk.directory / "people.csv"
    csv.write_text("email,name,company,locale\nmarc@client.example,Marc,Client SA,en\n"
                   "lea@client.example,Léa,Client SA,fr\n", encoding="utf-8")
    imported = desk.cli("accounts", "import", str(csv))
    assert imported.code == 0 and "2 welcome mails queued" in imported.out
    # A rejected file queues nothing: the welcomes share the accounts' transaction.
    bad = desk.directory / "bad.csv"
    bad.write_text("email,name,company\nnew@client.example,New,Client SA\nbroken,B,Client SA\n",
                   encoding="utf-8")
    assert desk.cli("accounts", "import", str(bad)).code == 1
    assert desk.cli("accounts", "import", str(csv)).out.endswith("0 welcome mails queued\n")
    engine = database.make_engine(f"sqlite:///{desk.directory / 'state' / 'maildesk.sqlite3'}")
    try:
        welcomes = _outbox(engine, "welcome")
        languages = {json.loads(w.recipients)[0]: _parts(composed(w))[0]["Content-Language"]
                     for w in welcomes}
        assert languages == {CUSTOMER: "fr", "marc@client.example": "en",
                             "lea@client.example": "fr"}
        assert_full_notice(composed(welcomes[1]), "en")
    finally:
        engine.dispose()


def test_without_a_welcome_the_first_acknowledgement_carries_the_full_notice(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    # The seeded accounts were created without a welcome, as accounts from before it were.
    assert pipeline.process(customer_mail().as_bytes(), SMTP).outcome == "ticket"
    [first] = _outbox(engine, "acknowledgement")
    assert_full_notice(composed(first), "fr")
    with Session(engine) as session:
        account = session.exec(select(Account).where(Account.email == CUSTOMER)).one()
        assert account.notice_sent_at is not None
    second = customer_mail(subject="Autre problème", text="Le bouton Valider ne répond plus.")
    assert pipeline.process(second.as_bytes(), SMTP).outcome == "ticket"
    [_, later] = _outbox(engine, "acknowledgement")
    _, text, markup = _parts(composed(later))
    footer = text.split("\n-- \n", 1)[1]
    assert FULL_NOTICE["fr"][0] not in footer
    assert POINTER["fr"] in footer and POINTER["fr"] in markup
    assert "5 ans après la désactivation de votre compte" in footer


STRANGER_FOOTER = {
    "fr": ["conserve le message que vous nous avez envoyé et votre adresse email en "
           "quarantaine", "pendant 30 jours au plus, puis les efface",
           "droits d'accès, de rectification, d'effacement, de limitation et d'opposition",
           "dpo@neocasesoftware.com", "CNIL"],
    "en": ["keeps the message you sent us and your email address in quarantine",
           "for at most 30 days, then erases them",
           "rights of access, rectification, erasure, restriction and objection",
           "dpo@neocasesoftware.com", "CNIL"],
}


def assert_stranger_footer(raw: bytes, locale: str) -> None:
    msg, text, markup = _parts(raw)
    assert msg["Content-Language"] == locale
    footer = text.split("\n-- \n", 1)[1]
    for needle in STRANGER_FOOTER[locale]:
        assert needle in footer and needle in markup, needle
    for account_wording in ("désactivation de votre compte", "account is deactivated"):
        assert account_wording not in text and account_wording not in markup


def test_a_stranger_is_told_what_is_kept_of_their_mail_and_for_how_long(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    stranger = customer_mail(sender="zoe@elsewhere.example").as_bytes()
    delivery = Delivery(source="smtp", envelope_from="zoe@elsewhere.example")
    assert pipeline.process(stranger, delivery).outcome == "quarantined"
    [answer] = _outbox(engine, "unknown_sender")
    assert_stranger_footer(composed(answer), "fr")
    with Session(engine) as session:
        english = pipeline.notifier.answer_unknown_sender(
            session, address="zoe@elsewhere.example", locale="en")
        assert_stranger_footer(composed(english), "en")
        session.rollback()
