"""Quoted history: where the new text of a reply ends, for every client's quoting style."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from maildesk.mail.htmltext import html_to_text
from maildesk.mail.parse import parse_mail
from maildesk.mail.quotes import REPLY_ABOVE_MARKER, scrub_reply_addresses, strip_quoted_reply

REPLY = "Merci, c'est réglé.\n\nClaire"
DESK = "support@desk.example"
SIGNED = "support+t4-0123456789abcdef01234567@desk.example"


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
        # Gmail in German, Spanish and Italian, wrapped before the address as Gmail does.
        f"Am Mi., 2. Dez. 2026 um 10:14 Uhr schrieb Support <\n{SIGNED}>:\n\n> Hallo",
        f"El mié, 2 dic 2026 a las 10:14, Support (<\n{SIGNED}>) escribió:\n\n> Hola",
        f"El mié, 2 dic 2026 a las 10:14, Support Maildesk (<\n{SIGNED}>)\nescribió:\n\n> Hola",
        f"Il giorno mer 2 dic 2026 alle ore 10:14 Support <\n{SIGNED}> ha scritto:\n\n> Ciao",
        # A Gmail attribution wrapped over three lines.
        f"On Wed, Dec 2, 2026 at 10:14\u202fAM Support Maildesk\n<{SIGNED}>\nwrote:\n\n> Hi",
        # Apple Mail.
        f"On 2 Dec 2026, at 10:14, Support <{SIGNED}> wrote:\n\n> Hi",
        f"Le 2 déc. 2026 à 10:14, Support <{SIGNED}> a écrit\xa0:\n\n> Bonjour",
        f"Am 02.12.2026 um 10:14 schrieb Support <{SIGNED}>:\n\n> Hallo",
        f"El 2 dic 2026, a las 10:14, Support <{SIGNED}> escribió:\n\n> Hola",
        f"Il giorno 2 dic 2026, alle ore 10:14, Support <{SIGNED}> ha scritto:\n\n> Ciao",
        # Thunderbird.
        "On 02/12/2026 10:14, Support wrote:\n> Hi",
        "Le 02/12/2026 à 10:14, Support a écrit :\n> Bonjour",
        "Am 02.12.26 um 10:14 schrieb Support:\n> Hallo",
        "El 2/12/26 a las 10:14, Support escribió:\n> Hola",
        "Il 02/12/26 10:14, Support ha scritto:\n> Ciao",
        # Outlook separators.
        "-----Ursprüngliche Nachricht-----\nVon: Support\nGesendet: Mittwoch\nBetreff: x\n\nHallo",
        "-----Mensaje original-----\nDe: Support\nEnviado: miércoles\nAsunto: x\n\nHola",
        "-----Messaggio originale-----\nDa: Support\nInviato: mercoledì\nOggetto: x\n\nCiao",
        "-------- Message d'origine --------\nDe : Support\nDate : 2 déc.\nObjet : x\n\nBonjour",
        # Outlook header blocks, below a rule (Outlook on the web) or not, with bold stars or not.
        f"________________________________\nVon: Support <{SIGNED}>\n"
        "Gesendet: Mittwoch, 2. Dezember 2026 10:14\nAn: Alex\nBetreff: AW: Rechnung\n\nHallo",
        f"Von: Support <{SIGNED}>\nGesendet: Mittwoch, 2. Dezember 2026 10:14\nAn: Alex\n"
        "Cc: Buchhaltung\nBetreff: AW: Rechnung\n\nHallo",
        f"*Von:* Support <{SIGNED}>\n*Gesendet:* Mittwoch\n*An:* Alex\n*Betreff:* Rechnung\n",
        f"________________________________\nDe: Support <{SIGNED}>\n"
        "Enviado: miércoles, 2 de diciembre de 2026 10:14\nPara: Alex\nAsunto: RE: Facturas\n",
        f"*De:* Support <{SIGNED}>\n*Enviado:* miércoles\n*Para:* Alex\n*Asunto:* Facturas\n",
        f"________________________________\nDa: Support <{SIGNED}>\n"
        "Inviato: mercoledì 2 dicembre 2026 10:14\nA: Alex\nOggetto: R: Magazzino\n\nCiao",
        f"*Da:* Support <{SIGNED}>\n*Inviato:* mercoledì\n*A:* Alex\n*Oggetto:* Magazzino\n",
        f"*De :* Support <{SIGNED}>\n*Envoyé :* mercredi\n*À :* Alex\n*Objet :* Facture\n",
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


# What only looks like history, and hostile input.


def test_strip_quoted_reply_keeps_lines_that_only_look_like_history() -> None:
    body = (
        "Am Montag haben wir 3 Geräte geliefert, wie Herr Berger schrieb.\n"
        "El 3 de mayo escribió el cliente otra vez.\n"
        "Il 4 maggio ha scritto anche il fornitore.\n"
        "Da: sabato la consegna è prevista in mattinata."
    )
    assert strip_quoted_reply(body) == body


@pytest.mark.parametrize(
    "marker",
    [
        "---------- Forwarded message ---------",
        "-------- Forwarded Message --------",
        "Begin forwarded message:",
        "---------- Message transféré ---------",
        "---------- Weitergeleitete Nachricht ---------",
        "Anfang der weitergeleiteten Nachricht:",
        "---------- Mensaje reenviado ---------",
        "Inicio del mensaje reenviado:",
        "---------- Messaggio inoltrato ---------",
        "Inizio messaggio inoltrato:",
    ],
)
def test_strip_quoted_reply_keeps_forwarded_header_blocks(marker: str) -> None:
    for block in (
        "From: Lager <lager@spedition.example>\nSent: Tuesday\nTo: Alex\nSubject: Lieferung",
        "Von: Lager <lager@spedition.example>\nGesendet: Dienstag\nAn: Alex\nBetreff: Lieferung",
        "De: Almacén <almacen@transporte.example>\nEnviado: martes\nPara: Alex\nAsunto: Envío",
        "Da: Magazzino <magazzino@trasporti.example>\nInviato: martedì\nA: Alex\nOggetto: Invio",
    ):
        text = f"Siehe unten.\n\n{marker}\n{block}\n\nDie Ware ist unterwegs."
        assert strip_quoted_reply(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "On " + "1 " * 500_000,
        "Am 1" + " schrieb x" * 100_000,
        "El 1" + " escribió" * 112_000 + ":",
        "-" * 1_000_000,
        "_" * 1_000_000,
        "From:" + " " * 1_000_000,
        "support+" * 125_000 + "@desk.example",
        # Many lines that each start like an attribution and end with a colon, but are not one.
        ("Am 1" + " schriebx" * 38 + ":\n") * 2_900,
        ("Il 1 ha scritto x" * 7 + ":\n") * 8_300,
        ("On 1 " + "x wrote " * 45 + "x:\n") * 2_800,
    ],
)
def test_strip_and_scrub_are_fast_on_hostile_text(text: str) -> None:
    assert len(text) >= 1_000_000
    start = time.perf_counter()
    strip_quoted_reply(text)
    scrub_reply_addresses(text, DESK)
    assert time.perf_counter() - start < 1.0


# scrub_reply_addresses.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"Write to {SIGNED}.", f"Write to {DESK}."),
        (f"Support <{SIGNED}>", f"Support <{DESK}>"),
        (f'<a href="mailto:{SIGNED}">Support</a>', f'<a href="mailto:{DESK}">Support</a>'),
        (f"From: Support [mailto:{SIGNED}]", f"From: Support [mailto:{DESK}]"),
        (f"reply to {SIGNED.upper()} now", f"reply to {DESK} now"),
        ("Support+T4-ABC@Desk.Example", DESK),
        (f"{SIGNED}, <{SIGNED}>", f"{DESK}, <{DESK}>"),
        ("mailto:support%2Bt4-0123456789abcdef01234567%40desk.example", f"mailto:{DESK}"),
        ('"support+t4 x"@desk.example', DESK),
        # Not ours: another domain, a longer domain, another local part, and the desk itself.
        ("support+x@other.example", "support+x@other.example"),
        ("support+x@desk.example.org", "support+x@desk.example.org"),
        ("support+x@sub.desk.example", "support+x@sub.desk.example"),
        ("my-support+x@desk.example", "my-support+x@desk.example"),
        ("customer.support+x@desk.example", "customer.support+x@desk.example"),
        (f"Write to {DESK}.", f"Write to {DESK}."),
        ("support@desk.example+x", "support@desk.example+x"),
    ],
)
def test_scrub_reply_addresses(text: str, expected: str) -> None:
    assert scrub_reply_addresses(text, DESK) == expected


def test_scrub_reply_addresses_uses_the_configured_desk_address() -> None:
    text = "help+t9-00ff@help.vendor.example and support+t9-00ff@desk.example"
    assert scrub_reply_addresses(text, "help@help.vendor.example") == (
        "help@help.vendor.example and support+t9-00ff@desk.example"
    )


# The corpus: agents answering a maildesk notification from their own mail client.

REPLIES = Path(__file__).parent.parent / "data" / "replies"
CLIENTS = ("gmail", "outlook", "owa", "applemail", "thunderbird")
LANGUAGES = ("en", "fr", "de", "es", "it")
# The customer's subject, which every quoted notification repeats, by language.
TOPICS = {
    "en": "Nightly CSV export stops at 2,000 rows",
    "fr": "L'export PDF ne marche plus",
    "de": "Rechnung 2026-118 doppelt gebucht",
    "es": "No puedo descargar las facturas de noviembre",
    "it": "Errore di sincronizzazione del magazzino",
}
# The first and last lines of the agent's new text in each file: what must be kept.
NEW_TEXT = {
    "applemail_de": ("Hallo Jonas,", "Alex"),
    "applemail_en": ("Hi Megan,", "Sent from my iPhone"),
    "applemail_es": ("Hola Lucía,", "Alex"),
    "applemail_fr": ("Bonjour Camille,", "Alex"),
    "applemail_it": ("Buongiorno Giulia,", "Alex"),
    "gmail_de": ("Hallo Herr Berger,", "Alex Keller"),
    "gmail_en": ("Hi Megan,", "Alex"),
    "gmail_es": ("Hola Lucía,", "Alex"),
    "gmail_fr": ("Bonjour Camille,", "Alex"),
    "gmail_it": ("Buongiorno Giulia,", "Alex"),
    "outlook_de": ("Guten Tag Herr Berger,", "Alex Keller"),
    "outlook_en": ("Hello Megan,", "Vendor Ltd – Customer Support"),
    "outlook_es": ("Buenos días, Lucía:", "Alex Keller"),
    "outlook_fr": ("Bonjour Madame Durand,", "Support client – Vendor"),
    "outlook_it": ("Gentile Sig.ra Rossi,", "Alex Keller"),
    "owa_de": ("Hallo Herr Berger,", "Alex"),
    "owa_en": ("Hi Megan,", "Alex"),
    "owa_es": ("Hola Lucía,", "Alex"),
    "owa_fr": ("Bonjour Camille,", "Alex"),
    "owa_it": ("Ciao Giulia,", "Alex"),
    "thunderbird_de": ("Hallo Herr Berger,", "Alex"),
    "thunderbird_en": ("Hi Megan,", "Customer Support, Vendor Ltd"),
    "thunderbird_es": ("Hola Lucía,", "Alex"),
    "thunderbird_fr": ("Bonjour Camille,", "Alex"),
    "thunderbird_it": ("Buongiorno Giulia,", "Alex"),
}
CORPUS = sorted(REPLIES.glob("*.eml"))


def test_the_corpus_covers_every_client_and_language() -> None:
    names = [path.stem for path in CORPUS]
    assert len(names) >= 20
    assert sorted(names) == sorted(NEW_TEXT)  # Every file has its expectations, and back.
    languages = Counter(name.rpartition("_")[2] for name in names)
    assert set(languages) == set(LANGUAGES)
    assert min(languages.values()) >= 3
    assert {name.rpartition("_")[0] for name in names} == set(CLIENTS)


def test_the_corpus_covers_the_usual_encodings() -> None:
    shapes: Counter[str] = Counter()
    for path in CORPUS:
        message = parse_mail(path.read_bytes()).message
        shapes[message.get_content_type()] += 1
        for part in message.walk():
            if part.get_content_type() == "text/plain":
                shapes[part.get("Content-Transfer-Encoding", "7bit").lower()] += 1
                if str(part.get_param("format", "")).lower() == "flowed":
                    shapes["format=flowed"] += 1
    for shape in ("text/plain", "multipart/alternative", "quoted-printable", "base64"):
        assert shapes[shape] >= 1, shape
    assert shapes["format=flowed"] >= 1


@pytest.mark.parametrize("path", CORPUS, ids=lambda path: path.stem)
def test_corpus_reply_keeps_only_the_new_text(path: Path) -> None:
    mail = parse_mail(path.read_bytes())
    assert mail.from_address == "alex@vendor.example"
    assert mail.to == [SIGNED]
    topic = TOPICS[path.stem.rpartition("_")[2]]
    # The quoted notification is there, with the reply address, before the history goes.
    assert SIGNED in mail.text
    assert topic in mail.text and topic in mail.subject
    stripped = strip_quoted_reply(mail.text)
    first, last = NEW_TEXT[path.stem]
    lines = stripped.splitlines()
    assert lines[0] == first
    assert lines[-1] == last
    assert "support+" not in stripped
    assert topic not in stripped
    assert scrub_reply_addresses(mail.text, DESK).count("support+") == 0


@pytest.mark.parametrize(
    "path", [path for path in CORPUS if b"text/html" in path.read_bytes()], ids=lambda p: p.stem
)
def test_corpus_html_alternative_gives_the_same_cut(path: Path) -> None:
    # An HTML-only reply is read through html_to_text: its quote must go just as well.
    mail = parse_mail(path.read_bytes())
    assert mail.html is not None
    stripped = strip_quoted_reply(html_to_text(mail.html))
    first, last = NEW_TEXT[path.stem]
    assert (stripped.splitlines()[0], stripped.splitlines()[-1]) == (first, last)
    assert "support+" not in stripped
    assert TOPICS[path.stem.rpartition("_")[2]] not in stripped
