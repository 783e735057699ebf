"""Agents' replies from real clients in five languages: their reply address never travels.

Each shape puts the agent's own signed reply address where that client quotes the mail it
answers (an attribution line, an Outlook header block, an "Original Message" separator) above
the quoted notification; the answer relayed to the customer must hold neither.
"""

from __future__ import annotations

from email import message_from_bytes, policy

import pytest
import sqlalchemy as sa
from e2e import AGENT, CUSTOMER, DESK, customer_mail
from outgoing import composed
from sqlmodel import Session, select

from maildesk.mail.message import Delivery
from maildesk.pipeline import Pipeline
from maildesk.signing import principal_of_agent, reply_address
from maildesk.store.models import Outbox

SMTP = Delivery(source="smtp", envelope_from=CUSTOMER, recipients=(DESK,))
NEW_TEXT = "Bonjour Claire, le correctif est en ligne depuis ce matin."
QUOTED = "Nouveau message du client sur la demande [#1] : Export PDF en erreur"

# (language, client, the lines that introduce the quoted notification); {addr} is the agent's
# reply address as the client shows it.
SHAPES = [
    ("en", "gmail", ["On Tue, 2 Dec 2026 at 10:14, Support <{addr}> wrote:"]),
    ("en", "gmail-wrapped", ["On Tue, 2 Dec 2026 at 10:14, Neocase Software Support <", "{addr}>",
                             "wrote:"]),
    ("en", "thunderbird", ["On 02/12/2026 10:14, Support wrote:"]),
    ("en", "outlook", ["________________________________", "From: Support <{addr}>",
                       "Sent: Tuesday, December 2, 2026 10:14 AM", "To: Alice Martin",
                       "Subject: [#1] New ticket"]),
    ("en", "outlook-old", ["-----Original Message-----", "From: Support [mailto:{addr}]",
                           "Sent: Tuesday, December 2, 2026 10:14", "Subject: [#1] New ticket"]),
    ("fr", "gmail", ["Le mar. 2 déc. 2026 à 10:14, Support <{addr}> a écrit :"]),
    ("fr", "apple", ["Le 2 déc. 2026 à 10:14, Support <{addr}> a écrit :"]),
    ("fr", "outlook", ["De : Support <{addr}>", "Envoyé : mardi 2 décembre 2026 10:14",
                       "À : Alice Martin", "Objet : [#1] Nouvelle demande"]),
    ("fr", "outlook-web", ["*De :* Support <{addr}>", "*Envoyé :* mardi 2 décembre 2026 10:14",
                           "*Objet :* [#1] Nouvelle demande"]),
    ("de", "gmail", ["Am Di., 2. Dez. 2026 um 10:14 Uhr schrieb Support <{addr}>:"]),
    ("de", "thunderbird", ["Am 02.12.26 um 10:14 schrieb Support:"]),
    ("de", "apple", ["Am 02.12.2026 um 10:14 schrieb Support <{addr}>:"]),
    ("de", "outlook", ["Von: Support <{addr}>", "Gesendet: Dienstag, 2. Dezember 2026 10:14",
                       "An: Alice Martin", "Betreff: [#1] Neues Ticket"]),
    ("de", "outlook-old", ["-----Ursprüngliche Nachricht-----", "Von: Support [mailto:{addr}]",
                           "Gesendet: Dienstag, 2. Dezember 2026 10:14", "Betreff: [#1]"]),
    ("es", "gmail", ["El mar, 2 dic 2026 a las 10:14, Support (<{addr}>) escribió:"]),
    ("es", "outlook", ["De: Support <{addr}>", "Enviado: martes, 2 de diciembre de 2026 10:14",
                       "Para: Alice Martin", "Asunto: [#1] Nueva solicitud"]),
    ("es", "outlook-old", ["-----Mensaje original-----", "De: Support [mailto:{addr}]",
                           "Enviado el: martes, 2 de diciembre de 2026 10:14", "Asunto: [#1]"]),
    ("it", "gmail", ["Il giorno mar 2 dic 2026 alle ore 10:14 Support <{addr}> ha scritto:"]),
    ("it", "thunderbird", ["Il 02/12/2026 10:14, Support ha scritto:"]),
    ("it", "outlook", ["Da: Support <{addr}>", "Inviato: martedì 2 dicembre 2026 10:14",
                       "A: Alice Martin", "Oggetto: [#1] Nuova richiesta"]),
    ("it", "outlook-old", ["-----Messaggio originale-----", "Da: Support [mailto:{addr}]",
                           "Inviato: martedì 2 dicembre 2026 10:14", "Oggetto: [#1]"]),
]


def test_the_shapes_cover_twenty_replies_in_five_languages() -> None:
    assert len(SHAPES) >= 20
    assert {language for language, _client, _lines in SHAPES} == {"en", "fr", "de", "es", "it"}


@pytest.mark.parametrize(("language", "client", "lines"), SHAPES,
                         ids=[f"{lang}-{client}" for lang, client, _ in SHAPES])
def test_the_agents_reply_address_never_reaches_the_customer(
    pipeline: Pipeline, engine: sa.Engine, language: str, client: str, lines: list[str]
) -> None:
    pipeline.process(customer_mail().as_bytes(), SMTP)
    address = reply_address(pipeline.reply_keys, DESK, 1, principal_of_agent(1))
    quoted = "\n".join(line.format(addr=address) for line in lines)
    body = f"{NEW_TEXT}\n\nAlice\n\n{quoted}\n\n> {QUOTED}\n> Répondre à : {address}\n"
    reply = customer_mail(sender=AGENT, to=address, subject="Re: [#1] Export PDF en erreur",
                          text=body)
    assert pipeline.process(reply.as_bytes(), SMTP).outcome == "answer"
    with Session(engine) as session:
        [answer] = session.exec(select(Outbox).where(Outbox.kind == "answer")).all()
    sent = message_from_bytes(composed(answer), policy=policy.default)
    text = sent.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = sent.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert NEW_TEXT in text
    for part in (text, html):
        assert "support+t" not in part.lower()
        assert QUOTED not in part
        # The quoted history is cut where it starts: not one line of its introduction is left.
        for line in lines:
            assert line.format(addr=DESK) not in part
    # The answer's own Reply-To is the customer's address; the agent's appears nowhere.
    assert address.lower() not in composed(answer).decode("ascii", "replace").lower()
