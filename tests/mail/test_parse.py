"""Tests for the parse stage: the sample corpus in tests/data and the helper functions."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from maildesk.mail.htmltext import clean_text, html_to_text
from maildesk.mail.limits import TRUNCATION_MARKER, ParseLimits
from maildesk.mail.message import ParsedMail
from maildesk.mail.parse import MalformedMail, parse_mail, sanitise_filename
from maildesk.mail.quotes import REPLY_ABOVE_MARKER, strip_quoted_reply

DATA = Path(__file__).parent.parent / "data"
PARIS = timezone(timedelta(hours=1))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load(name: str) -> ParsedMail:
    """Parse one sample of the corpus."""
    return parse_mail((DATA / name).read_bytes())


def assert_safe_html(html: str) -> None:
    """Check that sanitised HTML can neither run code nor load anything remote."""
    assert "<script" not in html.lower()
    assert "<style" not in html.lower()
    assert not re.search(r"\son\w+\s*=", html, re.I)
    assert "javascript:" not in html.lower()
    assert not re.search(r"<img[^>]*\ssrc=\"(?!cid:|data:image/)", html)
    assert "url(" not in html
    for anchor in re.findall(r"<a\s[^>]*>", html):
        assert 'rel="noopener noreferrer"' in anchor


# The corpus, one test per sample.


def test_outlook_fr_windows1252_qp() -> None:
    mail = load("outlook_fr_windows1252_qp.eml")
    assert mail.subject == "RE : Problème de facturation – commande n°4512"
    assert mail.from_name == "Dupont, Claire"
    assert mail.from_address == "claire.dupont@client.example"
    assert mail.to == ["support@desk.example"]
    assert mail.cc == []
    assert mail.delivered_to == []
    assert mail.message_id == (
        "<AM0PR07MB45312F1E8C3B2D4A9E6F1C2BD4A12@AM0PR07MB4531.eurprd07.prod.outlook.com>"
    )
    assert mail.in_reply_to == ["<ticket-4512.1764176580.9b2c@desk.example>"]
    assert mail.references == [
        "<ticket-4512.1764172980.7f3a@desk.example>",
        "<ticket-4512.1764176580.9b2c@desk.example>",
    ]
    assert mail.date == datetime(2026, 11, 27, 10, 42, 13, tzinfo=UTC)
    new_part = (
        "Bonjour,\n"
        "\n"
        "Merci pour votre retour rapide. J’ai bien reçu l’avoir de 149,90 € mais la facture"
        " « FA-2026-0412 » affiche toujours le montant d’origine.\n"
        "Pourriez-vous vérifier ? Nous avons déjà réglé la différence le 25/11.\n"
        "\n"
        "Cordialement,\n"
        "\n"
        "Claire Dupont\n"
        "Service comptabilité – Client SA\n"
        "Tél. : +33 1 23 45 67 89"
    )
    assert mail.text.startswith(new_part + "\n\nDe : Support Maildesk <support@desk.example>\n")
    assert "Envoyé : jeudi 26 novembre 2026 17:03\nÀ : Dupont, Claire" in mail.text
    assert mail.text.endswith("Bien à vous,\nL’équipe support")
    assert strip_quoted_reply(mail.text) == new_part
    assert mail.html is not None
    assert_safe_html(mail.html)
    assert "mso" not in mail.html
    assert "<b>Claire Dupont</b>" in mail.html
    assert strip_quoted_reply(html_to_text(mail.html)) == new_part
    assert mail.attachments == []
    assert mail.message["Thread-Index"] == "AQHbQk1rYz2Ff8TnS0aX1cJ3vQ0b3rZs9kEAgAAD7oA="


def test_outlook_attachment_accented_name() -> None:
    mail = load("outlook_attachment_accented_name.eml")
    assert mail.subject == "Paid invoice 12"
    assert (mail.from_name, mail.from_address) == ("Alice Martin", "alice.martin@vendor.example")
    assert mail.to == ["support@desk.example"]
    assert mail.cc == ["claire.dupont@client.example"]
    assert mail.text == (
        "Hello,\n\nPlease find attached the paid invoice n°12, as requested by Claire.\n\n"
        "Best regards,\nAlice Martin\nAccounts receivable - Vendor Ltd"
    )
    assert mail.html is not None
    assert_safe_html(mail.html)
    [pdf] = mail.attachments
    assert pdf.filename == "Facture_réglée_n°12.pdf"
    assert pdf.content_type == "application/pdf"
    assert len(pdf.data) == 594
    assert pdf.data.startswith(b"%PDF-1.4") and pdf.data.rstrip().endswith(b"%%EOF")
    assert pdf.inline is False
    assert pdf.content_id is None


def test_gmail_fr_utf8_base64() -> None:
    mail = load("gmail_fr_utf8_base64.eml")
    assert mail.subject == "Re: [Ticket #42] Accès impossible à l’espace client"
    assert (mail.from_name, mail.from_address) == ("Claire Dupont", "claire.dupont@client.example")
    assert mail.delivered_to == ["support@desk.example"]
    assert mail.message_id == "<CAF3b9Yx=kQ2m+Jv8Lr5e_pT0wZ8aYhN7cB4dE1fG2hJ3kL5mNw@mail.gmail.com>"
    assert mail.in_reply_to == mail.references == ["<ticket-42.1764234300.c0ffee@desk.example>"]
    assert mail.date == datetime(2026, 11, 27, 11, 15, 2, tzinfo=PARIS)
    new_part = (
        "Bonjour,\n"
        "\n"
        "Je n’arrive toujours pas à me connecter à l’espace client : le message «\n"
        "mot de passe expiré » s’affiche même après la réinitialisation.\n"
        "\n"
        "Pouvez-vous m’aider ?\n"
        "\n"
        "Merci d’avance,\n"
        "Claire"
    )
    assert mail.text.startswith(new_part + "\n\nLe ven. 27 nov. 2026 à 10:05, Support Maildesk")
    assert "a\nécrit\xa0:\n\n> " + REPLY_ABOVE_MARKER + "\n>\n> Bonjour Claire," in mail.text
    assert mail.text.endswith("> --\n> Support Maildesk\n>")
    assert strip_quoted_reply(mail.text) == new_part
    assert mail.html is not None
    assert_safe_html(mail.html)
    assert '<a href="https://desk.example/login" rel="noopener noreferrer">' in mail.html
    # The HTML alternative, converted, gives the same reply once the quote is stripped.
    assert strip_quoted_reply(html_to_text(mail.html)) == new_part.replace("«\nmot", "« mot")
    assert mail.attachments == []


def test_gmail_en_reply() -> None:
    mail = load("gmail_en_reply.eml")
    assert mail.subject == "Re: [Ticket #77] Nightly export missing"
    assert (mail.from_name, mail.from_address) == ("John Carter", "john.carter@client.example")
    assert mail.to == ["alice.martin@vendor.example"]
    assert mail.cc == ["support@desk.example", "ops@client.example"]
    assert mail.delivered_to == ["support@desk.example", "help@desk.example"]
    assert mail.references == [
        "<CAE2aQ1v8yN7m=Xr3pL2Kt9wq@mail.gmail.com>",
        "<ticket-77.1764252300.beef@desk.example>",
    ]
    assert mail.date == datetime(2026, 11, 27, 16, 31, 5, tzinfo=UTC)
    new_part = (
        "Hi Alice,\n"
        "\n"
        "Thanks, the export works now. One question remains: can we schedule it weekly instead"
        " of daily? Our finance team only needs it on Mondays, and the daily files are piling"
        " up in the shared folder.\n"
        "\n"
        "John"
    )
    # The quoted-printable soft breaks are joined back into one long line.
    assert mail.text.startswith(new_part + "\n\nOn Fri, Nov 27, 2026 at 10:05 AM Alice Martin")
    assert "<alice.martin@vendor.example>\nwrote:\n\n> Hi John," in mail.text
    assert ">> The nightly export did not arrive this morning." in mail.text
    assert strip_quoted_reply(mail.text) == new_part
    assert mail.html is not None
    assert_safe_html(mail.html)
    assert strip_quoted_reply(html_to_text(mail.html)) == new_part


def test_thunderbird_fr_flowed_latin1() -> None:
    mail = load("thunderbird_fr_flowed_latin1.eml")
    assert mail.subject == "Re: [Ticket #42] Accès impossible à l'espace client"
    assert mail.from_name == "Claire Dupont (Société Générale des Eaux)"
    assert mail.from_address == "claire.dupont@client.example"  # The domain was Client.Example.
    assert mail.references == [
        "<ticket-42.1764234300.c0ffee@desk.example>",
        "<CAF3b9Yx=kQ2m+Jv8Lr5e_pT0wZ8aYhN7cB4dE1fG2hJ3kL5mNw@mail.gmail.com>",
    ]
    assert mail.date == datetime(2026, 11, 27, 11, 20, 45, tzinfo=PARIS)
    new_part = (
        "Bonjour,\n"
        "\n"
        "Je reviens vers vous concernant l'accès à l'espace client. Après la réinitialisation"
        " du mot de passe, le message d'erreur est toujours le même.\n"
        "\n"
        "Le journal du navigateur contient ces deux lignes :\n"
        "From auth.client.example: 403 Forbidden\n"
        "> redirect loop detected\n"
        "\n"
        "Merci,\n"
        "Claire\n"
        "\n"
        "--\n"
        "Claire Dupont\n"
        "Société Générale des Eaux"
    )
    assert mail.text == (
        new_part + "\n\n"
        "Le 27/11/2026 à 10:05, Support Maildesk a écrit :\n"
        "> " + REPLY_ABOVE_MARKER + "\n"
        ">\n"
        "> Bonjour Claire,\n"
        ">\n"
        "> Avez-vous essayé de vider le cache de votre navigateur ? Cela règle souvent le"
        " problème.\n"
        ">\n"
        "> --\n"
        "> Support Maildesk"
    )
    # The signature stays; only the history goes.
    assert strip_quoted_reply(mail.text) == new_part
    assert mail.html is None
    assert mail.attachments == []


def test_thunderbird_attachment_rfc2231() -> None:
    mail = load("thunderbird_attachment_rfc2231.eml")
    assert mail.subject == "Capture d’écran et relevé"
    assert mail.text == (
        "Bonjour,\n\nCi-joint la capture d'écran de l'erreur et le relevé de compte.\n\nClaire"
    )
    assert mail.html is None
    png, csv = mail.attachments
    assert png.filename == "été capture d'écran.png"
    assert png.content_type == "image/png"
    assert len(png.data) == 73 and png.data.startswith(PNG_MAGIC)
    assert png.inline is False  # Content-Disposition: attachment, and no HTML refers to it.
    # RFC 2231 continuations (filename*0*, filename*1*) are joined and decoded.
    assert csv.filename == "Relevé de compte novembre 2026 – Société Générale des Eaux.csv"
    assert csv.content_type == "text/csv"
    assert csv.data == "Date;Libellé;Montant\r\n25/11/2026;Virement reçu;149,90\r\n".encode()
    assert csv.inline is False


def test_apple_mail_related_inline_image() -> None:
    mail = load("apple_mail_related_inline_image.eml")
    assert mail.subject == "Bon de commande signé et capture"
    assert (mail.from_name, mail.from_address) == ("Alice Martin", "alice.martin@vendor.example")
    # format=flowed with DelSp=yes: the soft break inside the URL leaves no space behind.
    assert mail.text == (
        "Bonjour,\n"
        "\n"
        "Voici la capture de l’erreur et le bon de commande signé en pièce jointe. Le lien de"
        " suivi est https://vendor.example/suivi/commande/4512/statut-detaille.\n"
        "\n"
        "Alice"
    )
    assert mail.html is not None
    assert_safe_html(mail.html)
    assert '<img src="cid:F3C1A2B4-5D6E-4F70-8192-A3B4C5D6E7F8"' in mail.html
    image, pdf = mail.attachments
    # Apple Mail sends decomposed accents; names come out composed (NFC).
    assert image.filename == "Capture d’écran 2026-11-27 à 10.12.03.png"
    assert image.content_type == "image/png"
    assert len(image.data) == 73 and image.data.startswith(PNG_MAGIC)
    assert image.inline is True
    assert image.content_id == "F3C1A2B4-5D6E-4F70-8192-A3B4C5D6E7F8"
    assert pdf.filename == "Bon de commande signé.pdf"
    assert pdf.content_type == "application/pdf"
    assert len(pdf.data) == 603 and pdf.data.startswith(b"%PDF")
    # Apple Mail marks every attachment "inline"; only images count as inline.
    assert pdf.inline is False
    assert pdf.content_id is None


def test_html_only_fr() -> None:
    mail = load("html_only_fr.eml")
    assert mail.subject == "Nouvelle demande de contact : facture et avoir"
    assert mail.from_name == "Formulaire de contact – Client SA"
    assert mail.from_address == "no-reply@crm.client.example"
    assert mail.text == (
        "Nouvelle demande de contact\n"
        "\n"
        "Bonjour l’équipe support,\n"
        "Un client a rempli le formulaire :\n"
        "\n"
        "- Nom : Claire Dupont\n"
        "- Société : Client SA\n"
        "- Sujet : Facture « FA-2026-0412 » & avoir\n"
        "\n"
        "Message : Le montant de la facture ne correspond pas au devis.\n"
        "\n"
        "Consulter la demande : ouvrir dans le CRM (https://crm.client.example/demandes/8842)\n"
        "Site : www.client.example\n"
        "\n"
        "Se désinscrire"
    )
    for leaked in ("tracking", "document", "font-family", "Nouvelle demande depuis"):
        assert leaked not in mail.text
    assert mail.html is not None
    assert_safe_html(mail.html)
    assert "tracker.example" not in mail.html
    assert "document.cookie" not in mail.html
    assert "<li><strong>Nom&nbsp;:</strong> Claire Dupont</li>" in mail.html
    assert '<p style="color:#333333">' in mail.html
    assert mail.attachments == []


def test_iso8859_15_subject() -> None:
    mail = load("iso8859_15_subject.eml")
    assert mail.subject == "Devis à 200 € pour le cœur de réseau"
    assert mail.from_name == "Léa Cœurdevey"
    assert mail.from_address == "lea.coeurdevey@vendor.example"
    assert mail.delivered_to == ["support@desk.example"]  # Delivered-To and Envelope-To agree.
    assert mail.text == (
        "Bonjour,\n"
        "\n"
        "Suite à notre échange, voici le devis demandé : 200 € HT pour l'intervention\n"
        "sur le cœur de réseau, et 35 € HT par heure supplémentaire.\n"
        "\n"
        "Bien cordialement,\n"
        "Léa Cœurdevey"
    )
    assert mail.html is None
    assert mail.attachments == []


def test_forwarded_rfc822() -> None:
    raw = (DATA / "forwarded_rfc822.eml").read_bytes()
    mail = parse_mail(raw)
    assert mail.subject == "Fwd: Commande n° 4512 expédiée"
    assert mail.text == (
        "Hello,\n\nThe carrier says the parcel left on Thursday, see the forwarded mail.\n"
        "It has still not arrived.\n\nClaire"
    )
    # The attached mail's own PDF is not an attachment of the outer mail.
    [forwarded] = mail.attachments
    assert forwarded.filename == "Commande n° 4512 expédiée.eml"
    assert forwarded.content_type == "message/rfc822"
    assert forwarded.inline is False
    assert len(forwarded.data) == 1934
    assert forwarded.data in raw  # Written back byte for byte.
    inner = parse_mail(forwarded.data)
    assert inner.subject == "Commande n° 4512 expédiée"
    assert inner.from_name == "Logistique Transports Réunis"
    assert inner.text == "Votre commande n° 4512 a été expédiée. Le bordereau est joint."
    assert [(a.filename, len(a.data)) for a in inner.attachments] == [("bordereau-4512.pdf", 589)]


def test_malformed_no_from() -> None:
    with pytest.raises(MalformedMail) as caught:
        load("malformed_no_from.eml")
    assert caught.value.reason == "no From header"


def test_garbage() -> None:
    with pytest.raises(MalformedMail) as caught:
        load("garbage.eml")
    assert caught.value.reason == "no headers: not an email"


# parse_mail on hand-made and corrupt input.


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty input"),
        (b" \r\n\r\n ", "empty input"),
        (b"hello world", "no headers: not an email"),
        (b"\r\n\r\nbody without headers", "no headers: not an email"),
        (b"From: MAILER-DAEMON\r\n\r\nx", "From header has no usable address"),
        (b"From: undisclosed-recipients:;\r\n\r\nx", "From header has no usable address"),
    ],
)
def test_unusable_mails(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedMail) as caught:
        parse_mail(raw)
    assert caught.value.reason == reason
    assert str(caught.value) == reason


def test_truncated_multipart() -> None:
    mail = parse_mail(
        b"From: a@b.example\r\nSubject: t\r\n"
        b'Content-Type: multipart/mixed; boundary="XYZ"\r\n\r\n'
        b"--XYZ\r\nContent-Type: text/plain\r\n\r\nHello there\r\n"
        b'--XYZ\r\nContent-Type: application/pdf; name="x.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLj"
    )
    assert mail.text == "Hello there"
    assert [(a.filename, a.data) for a in mail.attachments] == [("x.pdf", b"%PDF-1.")]


def test_multipart_without_its_boundary_keeps_the_text() -> None:
    mail = parse_mail(b"From: a@b.example\r\nContent-Type: multipart/mixed\r\n\r\nsome text\r\n")
    assert mail.text == "some text"


def test_bad_base64_is_decoded_leniently() -> None:
    mail = parse_mail(
        b"From: a@b.example\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nQm9uam91ciDDqXTDqQ=!!*&^%\r\n"
    )
    assert mail.text == "Bonjour été"


def test_unknown_charsets_fall_back_to_utf8() -> None:
    mail = parse_mail(
        b"From: a@b.example\r\nSubject: =?x-unknown?q?caf=C3=A9?=\r\n"
        b'Content-Type: text/plain; charset="x-unknown"\r\nContent-Transfer-Encoding: 8bit\r\n'
        b"\r\nCaf\xc3\xa9 cr\xc3\xa8me\r\n"
    )
    assert mail.subject == "café"
    assert mail.text == "Café crème"


@pytest.mark.parametrize(
    ("charset", "body", "text"),
    [
        # A wrong label: Latin-1 bytes declared as UTF-8 fall back to Windows-1252.
        ("utf-8", b"r\xe9sum\xe9 \x80", "résumé €"),
        # No label at all (US-ASCII by default) on UTF-8 bytes.
        (None, "déjà".encode(), "déjà"),
        # Latin-1 labels are read as Windows-1252, as browsers do, for curly quotes.
        ("iso-8859-1", b"l\x92\xe9t\xe9", "l’été"),
        ("windows-1252", b"\x93ok\x94 \x96 \x80", "“ok” – €"),
    ],
)
def test_body_charsets(charset: str | None, body: bytes, text: str) -> None:
    content_type = f"text/plain; charset={charset}" if charset else "text/plain"
    raw = f"From: a@b.example\r\nContent-Type: {content_type}\r\n\r\n".encode() + body
    assert parse_mail(raw).text == text


def test_raw_8bit_headers_and_nul_bytes() -> None:
    mail = parse_mail(
        "From: Clé Dupont <c@x.example>\r\nSubject: Réponse été\r\n\r\nb".encode("latin-1")
    )
    assert (mail.subject, mail.from_name) == ("Réponse été", "Clé Dupont")
    mail = parse_mail(
        "From: Clé\x00 <claire@client.example>\r\nSubject: Ré\x00ponse\r\n\r\nb".encode()
    )
    assert (mail.subject, mail.from_name) == ("Réponse", "Clé")


def test_headers_edge_cases() -> None:
    mail = parse_mail(
        b"From: =?utf-8?q?Dupont=2C_Claire?= <claire.dupont@CLIENT.Example>\r\n"
        b"To: a@one.example, =?utf-8?q?B=C3=A9a?= <bea@two.example>, a@one.example\r\n"
        b"Subject: =?utf-8?b?UsOpcG9uc2U=?= =?utf-8?q?_=C3=A0?=\r\n   vous\r\n"
        b"Date: Fri, 27 Nov 2026 10:05:00 -0000\r\n"
        b"Message-ID: <<<>>>\r\n"
        b"References: < a@b >  garbage <c@d>\r\n\r\nx"
    )
    assert mail.from_name == "Dupont, Claire"
    assert mail.from_address == "claire.dupont@client.example"
    assert mail.to == ["a@one.example", "bea@two.example"]
    assert mail.subject == "Réponse à vous"
    assert mail.date == datetime(2026, 11, 27, 10, 5, tzinfo=UTC)
    assert mail.date is not None and mail.date.tzinfo is not None
    assert mail.message_id is None
    assert mail.references == ["<a@b>", "<c@d>"]
    assert parse_mail(b"From: a@b.example\r\nDate: yesterday\r\n\r\nx").date is None


def test_apple_mail_split_plain_body() -> None:
    mail = parse_mail(
        b"From: Alice Martin <alice.martin@vendor.example>\r\n"
        b'Content-Type: multipart/mixed; boundary="S"\r\n\r\n'
        b"--S\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nHere is the screenshot:\r\n"
        b"--S\r\nContent-Disposition: inline; filename=shot.png\r\nContent-Type: image/png\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n"
        b"--S\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nThanks!\r\n--S--\r\n"
    )
    assert mail.text == "Here is the screenshot:\n\nThanks!"
    [image] = mail.attachments
    assert (image.filename, image.inline, image.data) == ("shot.png", True, PNG_MAGIC)


def test_unnamed_non_text_parts_get_a_name() -> None:
    mail = parse_mail(
        b"From: a@b.example\r\n"
        b'Content-Type: multipart/mixed; boundary="S"\r\n\r\n'
        b"--S\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--S\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment\r\n\r\n%PDF\r\n"
        b"--S\r\nContent-Type: application/ms-tnef; name=winmail.dat\r\n\r\nx\r\n--S--\r\n"
    )
    assert [(a.filename, a.content_type) for a in mail.attachments] == [
        ("attachment.pdf", "application/pdf"),
        ("winmail.dat", "application/ms-tnef"),
    ]


CORRUPT_INPUTS = [
    # Fifteen hundred nested multiparts: the parser runs out of recursion.
    b"From: a@b.example\r\n"
    + b"".join(b'Content-Type: multipart/mixed; boundary="%d"\r\n\r\n--%d\r\n' % (i, i)
               for i in range(1500)),
    b"From: a@b.example\r\nContent-Type: text/\x00; charset*=x'y'%ZZ\r\n"
    b"Content-Disposition: attachment; filename*0*=bogus''%E9; filename*1=x\r\n\r\nx",
    b'From: a@b.example\r\nContent-Type: multipart/mixed; boundary="A"\r\n\r\n--A\r\n'
    b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!\r\n--A--",
    b"From: a@b.example\r\nContent-Type: multipart/alternative; boundary=\r\n\r\n--\r\n--",
    b"From: \x00\r\nSubject: \x00\r\nMessage-ID: \x00\r\n\r\n\x00",
    b"From: =?utf-8?b?!!!?= <a@b.example>\r\nSubject: =?utf-8?q?=ZZ?=\r\n\r\nx",
    b"\xff\xfe\x00F\x00r\x00o\x00m\x00:",
    bytes(range(256)) * 4,
]


@pytest.mark.parametrize("raw", CORRUPT_INPUTS)
def test_corrupt_input_raises_only_malformed_mail(raw: bytes) -> None:
    try:
        mail = parse_mail(raw)
    except MalformedMail as exc:
        assert exc.reason
    else:
        assert mail.from_address


@pytest.mark.parametrize("sample", sorted(p.name for p in DATA.glob("*.eml")))
def test_damaged_samples_raise_only_malformed_mail(sample: str) -> None:
    raw = (DATA / sample).read_bytes()
    rng = random.Random(sample)
    damaged = [raw[:cut] for cut in range(0, len(raw), max(1, len(raw) // 40))]
    for _ in range(60):
        flipped = bytearray(raw)
        for _ in range(rng.randint(1, 12)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        damaged.append(bytes(flipped))
    for variant in damaged:
        try:
            parse_mail(variant)
        except MalformedMail:
            pass


# strip_quoted_reply on every quoting style.

@pytest.mark.parametrize(
    ("name", "content_type", "expected"),
    [
        ("../../etc/passwd", "application/octet-stream", "passwd"),
        ("C:\\Users\\claire\\Desktop\\facture.pdf", "application/pdf", "facture.pdf"),
        ("fac\x00ture\x1f\x7f.pdf", "application/pdf", "facture.pdf"),
        ("line\r\nbreak\tname.txt", "text/plain", "line break name.txt"),
        # A right-to-left override would display "invoice_fdp.exe" as "invoice_exe.pdf".
        ("invoice_\u202efdp.exe", "application/octet-stream", "invoice_fdp.exe"),
        ("Facture réglée n°12.pdf", "application/pdf", "Facture réglée n°12.pdf"),
        ("e\u0301te\u0301.png", "image/png", "été.png"),
        ('Re: "devis" <v2>?.pdf', "application/pdf", "Re_ _devis_ _v2__.pdf"),
        ("  .hidden  ", "text/plain", "hidden"),
        (None, "application/pdf", "attachment.pdf"),
        ("", "image/png", "attachment.png"),
        ("..", "image/jpeg", "attachment.jpg"),
        ("/", "message/rfc822", "attachment.eml"),
        ("\x00\x01", "application/x-unknown-thing", "attachment"),
    ],
)
def test_sanitise_filename(name: str | None, content_type: str, expected: str) -> None:
    assert sanitise_filename(name, content_type) == expected


def test_sanitise_filename_truncates_but_keeps_the_extension() -> None:
    name = sanitise_filename("é" * 500 + ".pdf", "application/pdf")
    assert len(name) == 200
    assert name == "é" * 196 + ".pdf"
    assert len(sanitise_filename("x" * 500, "application/octet-stream")) == 200


def test_mails_too_large_or_of_too_many_parts_are_refused_quickly() -> None:
    from maildesk.mail.parse import MAX_BOUNDARY_LINES, MAX_MAIL_BYTES

    head = b"From: a@client.example\r\nSubject: x\r\n"
    with pytest.raises(MalformedMail, match="too large"):
        parse_mail(head + b"\r\n" + b"x" * (MAX_MAIL_BYTES + 1))
    parts = b"".join(
        b"--b\r\nContent-Type: text/plain\r\n\r\npart\r\n" for _ in range(MAX_BOUNDARY_LINES + 1)
    )
    bomb = head + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + parts + b"--b--\r\n"
    with pytest.raises(MalformedMail, match="too many MIME parts"):
        parse_mail(bomb)


# The From, and the other address headers.


def mail_from(from_value: bytes, *extra: bytes) -> bytes:
    """A plain mail with the given From value and extra header lines."""
    return (
        b"From: " + from_value + b"\r\n" + b"".join(line + b"\r\n" for line in extra)
        + b"To: support@desk.example\r\nSubject: Facture\r\n"
        b"Date: Fri, 27 Nov 2026 10:05:00 +0100\r\nMessage-ID: <f1@client.example>\r\n"
        b"\r\nBonjour\r\n"
    )


@pytest.mark.parametrize(
    ("from_value", "expected"),
    [
        (b"claire@client.example, mallory@evil.example",
         ("", "claire@client.example", "From has more than one address")),
        (b"claire@client.example <mallory@evil.example>",
         ("", "claire@client.example", "From has more than one address")),
        # An encoded word may not hold ":" or "@" (RFC 2047, 5): hidden from the splitter, it is
        # decoded as the display name, CR LF made a space, and that name holds an address.
        (b"=?UTF-8?Q?Claire_A=0D=0ABcc:_evil2@attacker.example?= <claire@client.example>",
         ("Claire A Bcc: evil2@attacker.example", "claire@client.example",
          "From display name contains another address")),
        (b'"mallory@evil.example" <claire@client.example>',
         ("mallory@evil.example", "claire@client.example",
          "From display name contains another address")),
        (b'"Claire@Client.Example" <claire@client.example>',
         ("Claire@Client.Example", "claire@client.example", None)),
        (b"Dupont, Claire <claire@client.example>",
         ("Claire", "claire@client.example", "From is not one clean address")),
        (b"=?utf-8?q?Dupont=2C_Claire?= <claire@CLIENT.example>",
         ("Dupont, Claire", "claire@client.example", None)),
        (b"claire@client.example (Claire Dupont)",
         ("Claire Dupont", "claire@client.example", None)),
        (b"=?utf-8?b?Q2xhaXJl?= =?utf-8?b?IER1cG9udA==?= <claire@client.example>",
         ("Claire Dupont", "claire@client.example", None)),
    ],
)
def test_from(from_value: bytes, expected: tuple[str, str, str | None]) -> None:
    mail = parse_mail(mail_from(from_value))
    assert (mail.from_name, mail.from_address, mail.from_problem) == expected


def test_two_from_headers() -> None:
    mail = parse_mail(mail_from(b"claire@client.example", b"From: mallory@evil.example"))
    assert (mail.from_address, mail.from_problem) == (
        "claire@client.example", "From has more than one address"
    )


@pytest.mark.parametrize(
    "from_value",
    [
        b"claire@client.example mallory@evil.example",
        b"g:" * 2000 + b"a@b.example",  # email.utils recurses once a group.
        b"<claire@@client.example>",
        b"Claire <claire@client>",
        b"<mallory@[203.0.113.7]>",
    ],
)
def test_from_without_one_clean_address(from_value: bytes) -> None:
    with pytest.raises(MalformedMail) as caught:
        parse_mail(mail_from(from_value))
    assert caught.value.reason == "From header has no usable address"


@pytest.mark.parametrize(
    "sample",
    sorted(p.name for p in DATA.glob("*.eml") if p.stem not in ("garbage", "malformed_no_from")),
)
def test_corpus_senders_are_trusted(sample: str) -> None:
    assert load(sample).from_problem is None


def test_reply_to_and_recipients_keep_clean_addresses_only() -> None:
    mail = parse_mail(
        mail_from(
            b"claire@client.example",
            b"Reply-To: Claire <claire@client.example>, not an address,\r\n"
            b" =?utf-8?q?B=C3=A9a?= <bea@Two.Example>",
            b"Cc: \"Bob\" <bob@@x.example>, <a b@c.example>, mallory@evil, ops@client.example",
        )
    )
    assert mail.reply_to == ["claire@client.example", "bea@two.example"]
    assert mail.cc == ["ops@client.example"]
    assert mail.to == ["support@desk.example"]


# Charsets: only codecs meant for mail decode anything.


@pytest.mark.parametrize(
    ("charset", "body", "text"),
    [
        ("x-unknown-alias", "Café crème".encode(), "Café crème"),
        ("x-unknown-alias", b"Caf\xe9 cr\xe8me", "Café crème"),
        ("unicode_escape", b"Caf\\xe9 \\ud800 \\x1b[31m", "Caf\\xe9 \\ud800 \\x1b[31m"),
        ("raw-unicode-escape", b"\\u202eexe.pdf", "\\u202eexe.pdf"),
        ("utf-7", b"+2AA-caf+AOk-", "+2AA-caf+AOk-"),
        ("punycode", b"caf-dma", "caf-dma"),
        ("idna", b"xn--caf-dma", "xn--caf-dma"),
        ("base64_codec", b"Q2Fmw6k=", "Q2Fmw6k="),
        ("rot13", b"Pnsr", "Pnsr"),
        ("iso-8859-15", b"c\xbdur \xa4", "cœur €"),
        ("utf-16", "été".encode("utf-16"), "été"),
        ('"utf-8"', "déjà".encode(), "déjà"),
    ],
)
def test_charsets_not_meant_for_mail_fall_back(charset: str, body: bytes, text: str) -> None:
    head = f"From: a@b.example\r\nContent-Type: text/plain; charset={charset}\r\n\r\n"
    assert parse_mail(head.encode() + body).text == text


@pytest.mark.parametrize(
    ("charset", "subject"),
    [
        ("utf-8", "café \\ud800"),
        ("unicode_escape", "café \\ud800"),
        ("x-unknown-alias", "café \\ud800"),
        ("iso-8859-1", "cafÃ© \\ud800"),
    ],
)
def test_encoded_word_charsets(charset: str, subject: str) -> None:
    raw = f"From: a@b.example\r\nSubject: =?{charset}?q?caf=C3=A9_=5Cud800?=\r\n\r\nx".encode()
    assert parse_mail(raw).subject == subject


@pytest.mark.parametrize("charset", ["utf-8", "unicode_escape", "x-unknown-alias", "punycode"])
def test_rfc2231_filename_charsets(charset: str) -> None:
    raw = (
        b'From: a@b.example\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nci-joint\r\n--b\r\n"
        b"Content-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename*=" + charset.encode()
        + b"''r%C3%A9sum%C3%A9.pdf\r\n\r\n%PDF\r\n--b--\r\n"
    )
    [pdf] = parse_mail(raw).attachments
    assert pdf.filename == "résumé.pdf"


def test_mime_headers_keep_the_header_object_api() -> None:
    mail = load("thunderbird_attachment_rfc2231.eml")
    [_, png, csv] = mail.message.iter_parts()
    assert png["Content-Disposition"].content_disposition == "attachment"
    assert png.is_attachment()
    assert csv["Content-Type"].content_type == "text/csv"
    assert csv["Content-Disposition"].params["filename"] == (
        "Relevé de compte novembre 2026 – Société Générale des Eaux.csv"
    )
    assert mail.message["Content-Type"].maintype == "multipart"


def test_email_accessors_never_run_a_codec_not_meant_for_mail() -> None:
    mail = parse_mail(
        b'From: a@b.example\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain; charset*=punycode''caf-dma\r\n"
        b"Content-Disposition: attachment; filename*=unicode_escape''%5Cud800.txt\r\n"
        b"\r\nx\r\n--b--\r\n"
    )
    [part] = mail.message.iter_parts()
    assert part.get_content_charset() == "caf-dma"
    assert part.get_filename() == "\\ud800.txt"


# Controls and bidi marks: gone from every text that leaves the parser.


def test_controls_in_encoded_words_do_not_reach_the_subject_or_names() -> None:
    mail = parse_mail(
        b"From: =?utf-8?q?Claire=E2=80=8F_Dupont=07?= <claire@client.example>\r\n"
        b"Subject: =?utf-8?q?Facture=00_n=C2=B0_12=1B[31m_=E2=80=AEfdp.exe=C2=85?=\r\n"
        b"\r\nx"
    )
    assert mail.subject == "Facture n° 12[31m fdp.exe"
    assert mail.from_name == "Claire Dupont"


def test_controls_in_the_body() -> None:
    mail = parse_mail(
        b"From: a@b.example\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        b"Bonjour\x00 Claire,\r\n\tligne\x1b[2J\x7f\r\n"
        b"\xc2\x85fin \xe2\x80\xae\xe2\x81\xa6ok\x0c\r\n"
    )
    assert mail.text == "Bonjour Claire,\n\tligne[2J\nfin ok"


def test_bidi_marks_in_rfc2231_filenames() -> None:
    raw = (
        b'From: a@b.example\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nvoir PJ\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''invoice_%E2%80%AEfdp.exe\r\n\r\nMZ\r\n"
        b"--b\r\nContent-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''%E2%81%A6rapport%E2%81%A9%00.pdf\r\n"
        b"\r\n%PDF\r\n--b--\r\n"
    )
    assert [a.filename for a in parse_mail(raw).attachments] == ["invoice_fdp.exe", "rapport.pdf"]


@pytest.mark.parametrize(
    ("value", "multiline", "expected"),
    [
        ("Claire A\r\nBcc: evil@attacker.example", False, "Claire A Bcc: evil@attacker.example"),
        ("a\x00b\x1b[0m\x7f\x85\x9f c", False, "ab[0m c"),
        ("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061cok", False, "ok"),
        ("  one\t two  ", False, "one two"),
        ("line 1\r\n\tline 2\x0b\x0c\n", True, "line 1\n\tline 2\n"),
        ("lone \ud800 surrogate", True, "lone \ufffd surrogate"),
        ("Réponse à l’équipe – 200 €", False, "Réponse à l’équipe – 200 €"),
    ],
)
def test_clean_text(value: str, multiline: bool, expected: str) -> None:
    assert clean_text(value, multiline=multiline) == expected


def test_text_limit() -> None:
    raw = b"From: a@b.example\r\n\r\n" + b"0123456789\r\n" * 5
    mail = parse_mail(raw, ParseLimits(max_text_chars=25))
    assert mail.text == "0123456789\n0123456789\n012\n\n" + TRUNCATION_MARKER.format(limit=25)
    assert mail.truncated is True
    assert parse_mail(raw).truncated is False


def test_text_limit_holds_for_parts_together() -> None:
    part = b"--b\r\nContent-Type: text/plain\r\n\r\n0123456789\r\n"
    raw = b'From: a@b.example\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n' + part * 3
    mail = parse_mail(raw + b"--b--\r\n", ParseLimits(max_text_chars=25))
    assert mail.text == "0123456789\n\n0123456789\n\n0\n\n" + TRUNCATION_MARKER.format(limit=25)
    assert mail.truncated is True
