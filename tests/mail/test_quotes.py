"""Quoted history: where the new text of a reply ends, for every client's quoting style."""

from __future__ import annotations

import pytest

from maildesk.mail.quotes import REPLY_ABOVE_MARKER, strip_quoted_reply

REPLY = "Merci, c'est réglé.\n\nClaire"


@pytest.mark.parametrize(
    "history",
    [
        REPLY_ABOVE_MARKER + "\nBonjour Claire,\nVotre ticket…",
        "> " + REPLY_ABOVE_MARKER + "\n> Bonjour Claire,",
        # Re-wrapped by a client, with the marker split across two lines.
        "> ##- Répondez au-dessus de cette ligne / Reply above\n> this line -##\n> Bonjour,",
        "##-\nRépondez au-dessus de cette ligne / Reply above this line -##\nBonjour,",
        "On Fri, Nov 27, 2026 at 10:05 AM Alice Martin <alice.martin@vendor.example> wrote:\n> Hi",
        "On Fri, Nov 27, 2026 at 10:05 AM Alice Martin <alice.martin@vendor.example>\n"
        "wrote:\n\n> Hi",
        "On 27 Nov 2026, at 10:05, Alice Martin <alice.martin@vendor.example> wrote:\n\n> Hi",
        "Le ven. 27 nov. 2026 à 10:05, Alice <a@b.c> a écrit :\n> Bonjour",
        "Le ven. 27 nov. 2026 à 10:05, Alice Martin <alice.martin@vendor.example> a\n"
        "écrit\xa0:\n> Bonjour",
        "Le 27/11/2026 à 10:05, Alice a écrit :\n> Bonjour",
        "Le 27 nov. 2026 à 10:05, Alice <a@b.c> a écrit :\n\n> Bonjour",
        "-----Original Message-----\nFrom: Alice\nSent: Friday\nSubject: x\n\nHello",
        "-----Message d'origine-----\nDe : Alice\nEnvoyé : vendredi\nObjet : x\n\nBonjour",
        "________________________________\nFrom: Alice Martin <alice.martin@vendor.example>\n"
        "Sent: Friday, November 27, 2026 10:05 AM\nTo: Claire Dupont\nSubject: RE: Invoice\n"
        "\nHello",
        "________________________________\nDe : Alice Martin <alice.martin@vendor.example>\n"
        "Envoyé : vendredi 27 novembre 2026 10:05\nÀ : Claire Dupont\nObjet : RE: Facture\n"
        "\nBonjour",
        "De\xa0: Alice Martin\nEnvoyé\xa0: vendredi 27 novembre 2026 10:05\nÀ\xa0: Claire Dupont\n"
        "Cc\xa0: Support\nObjet\xa0: RE: Facture\n\nBonjour",
        "*From:* Alice Martin <alice.martin@vendor.example>\n*Sent:* Friday\n*To:* Claire\n"
        "*Subject:* Invoice\n\nHello",
        "> quoted without any attribution\n> more\n>",
    ],
)
def test_strip_quoted_reply_styles(history: str) -> None:
    assert strip_quoted_reply(f"{REPLY}\n\n{history}\n") == REPLY


def test_strip_quoted_reply_keeps_what_is_not_history() -> None:
    signature = "Claire\n-- \nClaire Dupont\nClient SA"
    assert strip_quoted_reply(signature) == signature
    body = "On Monday we shipped 3 units.\nThe customer wrote back.\nOn 27/11 the rest."
    assert strip_quoted_reply(body) == body
    # Quotes in the middle of the text (inline replies) stay; only trailing ones go.
    inline = "> Did it work?\nYes.\n> And the export?\nAlso.\n\n> Thanks\n> Alice"
    assert strip_quoted_reply(inline) == "> Did it work?\nYes.\n> And the export?\nAlso."


def test_strip_quoted_reply_keeps_forwarded_messages() -> None:
    gmail = (
        "Voir ci-dessous.\n\n---------- Forwarded message ---------\n"
        "From: Transports <logistique@transport.example>\nDate: Thu, Nov 26, 2026\n"
        "Subject: Commande\nTo: <claire.dupont@client.example>\n\nVotre commande est partie."
    )
    assert strip_quoted_reply(gmail) == gmail
    apple = (
        "FYI\n\nDébut du message réexpédié :\n\nDe: Transports <logistique@transport.example>\n"
        "Objet: Commande\nDate: 26 novembre 2026 à 10:45\n\nVotre commande est partie."
    )
    assert strip_quoted_reply(apple) == apple


def test_strip_quoted_reply_never_returns_nothing() -> None:
    bottom_posted = "On Fri, Nov 27, 2026 at 10:05 AM Alice <a@b.c> wrote:\n> Hi\n\nThanks!\n"
    assert strip_quoted_reply(bottom_posted) == bottom_posted.strip()
    assert strip_quoted_reply("\n> only quotes\n") == "> only quotes"
    assert strip_quoted_reply("") == ""


def test_strip_quoted_reply_handles_crlf_and_long_lines() -> None:
    assert strip_quoted_reply("Yes.\r\n\r\nOn Fri, 27 Nov 2026, Bob wrote:\r\n> q") == "Yes."
    long_line = "Le " + "1 " * 50_000
    assert strip_quoted_reply(long_line) == long_line.strip()


# html_to_text.
