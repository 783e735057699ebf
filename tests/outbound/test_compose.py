"""The compose stage: an Outbox draft becomes the MIME mail that leaves."""

from __future__ import annotations

import random
import re
from email import message_from_bytes, policy
from pathlib import Path

import pytest

from maildesk.outbound.compose import (
    STREAM_BYTES,
    Draft,
    DraftFile,
    build,
    outgoing_bytes,
    outgoing_mail,
    stored_files,
)
from maildesk.rules.classify import LOOP_HEADER
from maildesk.store.files import ATTACHMENTS_DIR, SPOOL_DIR, content_path, sha256_hex

LONG_ID = "<" + "x" * 120 + "@mail.outlook.example>"


def draft(**changes: object) -> Draft:
    values: dict[str, object] = dict(
        message_id="<1.maildesk@desk.example>", date="Mon, 07 Dec 2026 10:00:00 +0000",
        sender=("Support Éditeur", "support@desk.example"), to=("Léa Martin", "lea@client.example"),
        subject="[#3] Export PDF en erreur", text="Bonjour Léa,\n\nC'est réglé.\n",
        html="<p>Bonjour Léa,</p>", language="fr", loop="desk.example",
        in_reply_to=LONG_ID, references=("<0@desk.example>", LONG_ID),
        reply_to=("Support Éditeur", "support+t3.abc@desk.example"), auto="auto-replied",
    )
    values.update(changes)
    return Draft(**values)  # type: ignore[arg-type]


def test_a_draft_survives_its_json_and_composes_every_header() -> None:
    stored = draft()
    again = Draft.from_json(stored.to_json())
    assert again == stored
    mail = message_from_bytes(build(again, lambda f: None), policy=policy.default)
    assert mail["Message-ID"] == "<1.maildesk@desk.example>"
    assert mail["From"].addresses[0].display_name == "Support Éditeur"
    assert mail["Reply-To"].addresses[0].addr_spec == "support+t3.abc@desk.example"
    assert mail["Auto-Submitted"] == "auto-replied" and mail[LOOP_HEADER] == "desk.example"
    assert mail["Content-Language"] == "fr"
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert text.replace("\r\n", "\n").strip() == "Bonjour Léa,\n\nC'est réglé."
    # A long Outlook msg-id stays one token: never an encoded word, which breaks threading.
    assert LONG_ID in build(again, lambda f: None).decode("ascii")


def test_attachments_are_read_from_the_store_and_an_erased_one_is_left_out(tmp_path: Path) -> None:
    digest = sha256_hex(b"%PDF-1.7 facture")
    path = content_path(tmp_path, ATTACHMENTS_DIR, digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"%PDF-1.7 facture")
    files = (DraftFile(digest, "application/pdf", "Facture n°12.pdf"),
             DraftFile("0" * 64, "image/png", "erased.png"))
    mail = message_from_bytes(build(draft(files=files), stored_files(tmp_path)),
                              policy=policy.default)
    [attached] = list(mail.iter_attachments())
    assert attached.get_filename() == "Facture n°12.pdf"
    assert attached.get_content() == b"%PDF-1.7 facture"


def test_a_row_without_a_draft_leaves_with_its_stored_bytes(tmp_path: Path) -> None:
    assert outgoing_bytes(b"Subject: old\r\n\r\nqueued by 0007\r\n", None, tmp_path) == (
        b"Subject: old\r\n\r\nqueued by 0007\r\n")


@pytest.mark.parametrize("text", ["{}", "[1]", "not json", '{"version": 99}',
                                  '{"version": 1, "message_id": "<a@b>"}'])
def test_what_is_not_a_draft_is_refused_with_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        Draft.from_json(text)


def store_file(state_dir: Path, data: bytes) -> str:
    digest = sha256_hex(data)
    path = content_path(state_dir, ATTACHMENTS_DIR, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def same_boundaries(mail: bytes) -> bytes:
    """The mail with its MIME boundaries, which the generator draws at random, made fixed."""
    for n, boundary in enumerate(re.findall(rb'boundary="([^"]+)"', mail)):
        mail = mail.replace(boundary, b"boundary-%d" % n)
    return mail


@pytest.mark.parametrize("size", [STREAM_BYTES + 1, 3 * 2**20 + 2])
def test_a_draft_with_large_files_is_spooled_with_the_same_bytes_as_build(
    tmp_path: Path, size: int
) -> None:
    large, small = random.Random(size).randbytes(size), b"%PDF-1.7 small"
    files = (DraftFile(store_file(tmp_path, large), "application/pdf", "export.pdf"),
             DraftFile(store_file(tmp_path, small), "application/pdf", "small.pdf"),
             DraftFile(store_file(tmp_path, large[::-1]), "image/png", "other.png"),
             DraftFile("0" * 64, "image/png", "erased.png"))  # fmt: skip
    stored = draft(files=files).to_json()
    spooled = outgoing_mail(b"", stored, tmp_path)
    assert isinstance(spooled, Path) and spooled.parent == tmp_path / SPOOL_DIR
    whole = outgoing_bytes(b"", stored, tmp_path)
    assert same_boundaries(spooled.read_bytes()) == same_boundaries(whole)
    mail = message_from_bytes(spooled.read_bytes(), policy=policy.default)
    assert [a.get_content() for a in mail.iter_attachments()] == [large, small, large[::-1]]


def test_a_draft_with_only_small_files_is_composed_in_memory(tmp_path: Path) -> None:
    files = (DraftFile(store_file(tmp_path, b"x" * STREAM_BYTES), "application/pdf", "a.pdf"),)
    composed = outgoing_mail(b"", draft(files=files).to_json(), tmp_path)
    assert isinstance(composed, bytes) and not (tmp_path / SPOOL_DIR).exists()
