"""Forwards: the original sender, subject, date and text of a mail that an agent forwarded."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest

from maildesk.mail import forward
from maildesk.mail.forward import forwarded_original
from maildesk.mail.message import ParsedMail
from maildesk.mail.parse import parse_mail

DATA = Path(__file__).parent.parent / "data"
FORWARDS = DATA / "forwards"


def load(name: str) -> ParsedMail:
    return parse_mail((FORWARDS / name).read_bytes())


def with_text(text: str) -> ParsedMail:
    """A plain agent's mail whose text is `text`."""
    return dataclasses.replace(load("thunderbird_en_inline.eml"), text=text, attachments=[])


@pytest.mark.parametrize(
    ("sample", "address", "name", "subject", "date_text", "text_start"),
    [
        pytest.param("gmail_en_inline.eml", "jean.martin@client.example", "Jean Martin",
                     "Invoice 2026-014 is wrong", "Mon, Jan 12, 2026 at 10:15 AM",
                     "Hello Sophie,\n\nInvoice 2026-014 charges us twice", id="gmail-en"),
        pytest.param("gmail_fr_inline.eml", "claire.dupont@client.example", "Claire Dupont",
                     "Problème de connexion au portail", "lun. 12 janv. 2026 à 10:47",
                     "Bonjour Sophie,\n\nDepuis ce matin", id="gmail-fr"),
        pytest.param("outlook_desktop_en.eml", "priya.shah@client.example", "Priya Shah",
                     "Export to CSV fails since the update", "Monday, January 12, 2026 9:48 AM",
                     "Hi Sophie,", id="outlook-desktop-en"),
        pytest.param("outlook_desktop_fr.eml", "marc.lefevre@client.example", "Marc Lefèvre",
                     "Impossible d’exporter la facture", "lundi 12 janvier 2026 09:48",
                     "Bonjour,", id="outlook-desktop-fr-windows-1252"),
        pytest.param("outlook_web_en.eml", "tom.becker@client.example", "Tom Becker",
                     "Password reset link expired", "Monday, January 12, 2026 10:03",
                     "Hello,\nThe password reset link expired", id="outlook-web-en"),
        pytest.param("outlook_2010_original_message.eml", "paul.girard@client.example",
                     "Paul Girard", "Licence renewal", "Monday, January 12, 2026 11:14 AM",
                     "Hi,\n\nOur licence runs out", id="outlook-2010-mailto"),
        pytest.param("thunderbird_en_inline.eml", "lucy.grant@client.example", "Lucy Grant",
                     "Delivery address change", "Mon, 12 Jan 2026 10:20:33 +0100",
                     "Hello,\n\nPlease ship order 4512", id="thunderbird-en-lf"),
        pytest.param("thunderbird_fr_inline.eml", "elodie.moreau@client.example",
                     "Élodie Moreau", "Changement d'adresse de livraison",
                     "Mon, 12 Jan 2026 10:20:33 +0100", "Bonjour,\n\nMerci de livrer",
                     id="thunderbird-fr-lf-8bit"),
        pytest.param("apple_mail_en_inline.eml", "hannah.kim@client.example", "Hannah Kim",
                     "Cannot add a second user", "12 January 2026 at 10:31:07 CET",
                     'Hi Sophie,\n\nThe "Add user" button', id="apple-mail-en-quoted"),
        pytest.param("apple_mail_fr_inline.eml", "lea.fontaine@client.example", "Léa Fontaine",
                     "Accès refusé au portail", "12 janvier 2026 à 10:31:07 UTC+1",
                     "Bonjour,\n\nLe portail me répond « accès refusé »", id="apple-mail-fr"),
        pytest.param("thunderbird_attached_rfc822.eml", "noemie.brunet@client.example",
                     "Noémie Brunet", "Question about single sign-on",
                     "Mon, 12 Jan 2026 09:05:47 +0100", "Hello,\n\nDoes the portal support",
                     id="attached-rfc822"),
    ],
)
def test_each_client_shape(
    sample: str, address: str, name: str, subject: str, date_text: str, text_start: str
) -> None:
    found = forwarded_original(load(sample))
    assert found is not None
    assert (found.address, found.name, found.subject, found.date_text) == (
        address, name, subject, date_text
    )
    assert found.text.startswith(text_start)
    # The agent's own lines stay out of the original's text.
    assert "#new" not in found.text and "#nouveau" not in found.text


def test_the_forward_text_ends_with_the_original() -> None:
    found = forwarded_original(load("outlook_web_en.eml"))
    assert found is not None
    assert found.text == (
        "Hello,\nThe password reset link expired before I could use it. Could you send a new"
        " one?\nTom"
    )
    assert found.via == "inline" and found.message_id is None


def test_an_attached_original_is_preferred_and_keeps_its_headers() -> None:
    found = forwarded_original(load("thunderbird_attached_rfc822.eml"))
    assert found is not None
    assert found.via == "attachment"
    assert found.message_id == "<4e6f8a0b-2c4d-4e6f-8a0b-2c4d6e8f0a1b@client.example>"
    assert found.date == datetime(2026, 1, 12, 8, 5, 47, tzinfo=UTC)
    assert found.text.endswith("Noémie")


def test_dates_with_a_zone_are_read_and_others_left_as_text() -> None:
    thunderbird = forwarded_original(load("thunderbird_en_inline.eml"))
    outlook = forwarded_original(load("outlook_desktop_en.eml"))
    assert thunderbird is not None and outlook is not None
    assert thunderbird.date == datetime(2026, 1, 12, 9, 20, 33, tzinfo=UTC)
    # "9:48 AM" has no zone: read as UTC it would be wrong by an hour, so it is not read.
    assert outlook.date is None


def test_an_inline_forward_wins_over_nothing_but_an_attachment_wins_over_inline() -> None:
    attached = load("thunderbird_attached_rfc822.eml")
    inline = load("gmail_en_inline.eml")
    both = dataclasses.replace(attached, text=inline.text)
    found = forwarded_original(both)
    assert found is not None and found.address == "noemie.brunet@client.example"


@pytest.mark.parametrize(
    "sample", [DATA / "gmail_en_reply.eml", DATA / "replies" / "applemail_fr.eml",
               DATA / "replies" / "thunderbird_en.eml", DATA / "html_only_fr.eml"],
    ids=lambda p: p.stem,
)
def test_a_mail_that_forwards_nothing_gives_none(sample: Path) -> None:
    assert forwarded_original(parse_mail(sample.read_bytes())) is None


@pytest.mark.parametrize(
    "from_line",
    [
        pytest.param("From: Jean Martin", id="a-name-without-an-address"),
        pytest.param("From: a@client.example, b@client.example", id="two-addresses"),
        pytest.param("From: jean.martin", id="no-domain"),
        pytest.param('From: "boss@client.example" <x@evil.example>', id="an-address-as-name"),
        pytest.param("From:", id="empty"),
    ],
)
def test_a_forward_without_one_clear_sender_gives_none(from_line: str) -> None:
    text = (
        "#new\n\n---------- Forwarded message ---------\n"
        f"{from_line}\nDate: Mon, Jan 12, 2026 at 10:15 AM\nSubject: Hi\n\nHello\n"
    )
    assert forwarded_original(with_text(text)) is None


def test_an_outlook_reply_reads_as_a_forward_of_what_it_quotes() -> None:
    # Outlook writes the same block above a reply's history: #new is what asks for a forward.
    found = forwarded_original(parse_mail((DATA / "outlook_fr_windows1252_qp.eml").read_bytes()))
    assert found is not None
    assert (found.address, found.via) == ("support@desk.example", "inline")


def test_outlook_wraps_a_long_to_line() -> None:
    text = (
        "#new\n\n________________________________\n"
        "From: Jean Martin <jean.martin@client.example>\nSent: Monday, January 12, 2026 10:03\n"
        "To: Sophie Laurent <sophie.laurent@desk.example>; Anne Roux\n"
        "<anne.roux@client.example>\nSubject: Two people\n\nHello\n"
    )
    found = forwarded_original(with_text(text))
    assert found is not None
    assert (found.subject, found.text) == ("Two people", "Hello")


def test_a_forward_beyond_the_scanned_part_is_not_looked_for() -> None:
    block = (
        "---------- Forwarded message ---------\n"
        "From: Jean Martin <jean.martin@client.example>\nSubject: Late\n\nHello\n"
    )
    near = "x\n" * ((forward.MAX_SCAN_CHARS - 1000) // 2)
    far = "x\n" * (forward.MAX_SCAN_CHARS // 2)
    assert forwarded_original(with_text(near + block)) is not None
    assert forwarded_original(with_text(far + block)) is None


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param("---------- Forwarded message ---------\n" + "From: a\n" * 130_000,
                     id="header-lines-without-an-address"),
        pytest.param("#new\n" + "> " * 500_000, id="one-long-quoted-line"),
        pytest.param("-------- Forwarded Message --------\n" * 30_000, id="separators"),
    ],
)
def test_a_hostile_megabyte_without_a_sender_gives_none(hostile: str) -> None:
    assert len(hostile) >= 10**6
    assert forwarded_original(with_text(hostile)) is None


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param("Begin forwarded message:\n\nFrom: j@client.example\n\n" + "y" * 2**20,
                     id="a-megabyte-body-line"),
        pytest.param("From: j <j@client.example>\nSent: now\nSubject: s\n" * 25_000,
                     id="outlook-blocks"),
    ],
)
def test_a_hostile_megabyte_forward_keeps_at_most_the_cap(hostile: str) -> None:
    assert len(hostile) >= 10**6
    found = forwarded_original(with_text(hostile))
    assert found is not None
    assert found.address == "j@client.example"
    assert 0 < len(found.text) <= forward.MAX_SCAN_CHARS
