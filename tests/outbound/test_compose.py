"""The compose stage: an Outbox draft becomes the MIME mail that leaves."""

from __future__ import annotations

from email import message_from_bytes, policy
from pathlib import Path

import pytest

from maildesk.outbound.compose import Draft, DraftFile, build, outgoing_bytes, stored_files
from maildesk.rules.classify import LOOP_HEADER
from maildesk.store.files import ATTACHMENTS_DIR, content_path, sha256_hex

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
