"""The compose child: a claim's drafts composed ahead, in order, and the sender's fallback."""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import replace
from email import message_from_bytes, policy
from pathlib import Path

from maildesk.outbound.compose import STREAM_BYTES, Draft, DraftFile, build
from maildesk.outbound.compose_worker import ComposeAhead
from maildesk.outbound.transport import TemporaryFailure
from maildesk.store.files import ATTACHMENTS_DIR, SPOOL_DIR, content_path, sha256_hex


def handed(ahead: ComposeAhead, drafts: list[str | None]) -> None:
    """Hand a claim to the child once it is ready (until then the sender composes itself)."""
    deadline = time.monotonic() + 30
    while not ahead.start_claim(drafts):
        assert time.monotonic() < deadline, "the compose child never became ready"
        time.sleep(0.01)


def draft(n: int) -> Draft:
    return Draft(
        message_id=f"<{n}.maildesk@desk.example>", date="Mon, 07 Dec 2026 10:00:00 +0000",
        sender=("Support", "support@desk.example"), to=("Léa", "lea@client.example"),
        subject=f"[#{n}] Demande", text=f"Mail {n}\n", html=f"<p>Mail {n}</p>",
        language="fr", loop="desk.example",
    )


def _without_boundaries(mail: bytes) -> bytes:
    boundary = re.search(rb'boundary="([^"]+)"', mail)
    assert boundary is not None
    return mail.replace(boundary.group(1), b"B")


def test_the_child_composes_a_claim_in_order_as_the_sender_would(tmp_path: Path) -> None:
    ahead = ComposeAhead(tmp_path)
    try:
        drafts = [draft(n) for n in range(5)]
        # Rows without a draft (queued before 0008) are not the child's.
        handed(ahead, [drafts[0].to_json(), None, *(d.to_json() for d in drafts[1:])])
        answers = [ahead.next() for _ in drafts]
        assert ahead.next() is None  # Nothing more was asked.
        # The same mail as built here, but for the MIME boundaries, which are random.
        for answer, expected in zip(answers, drafts, strict=True):
            assert isinstance(answer, bytes)
            here = build(expected, lambda f: None)
            assert _without_boundaries(answer) == _without_boundaries(here)
    finally:
        ahead.close()


def test_a_claim_before_the_child_is_ready_is_left_to_the_sender(tmp_path: Path) -> None:
    ahead = ComposeAhead(tmp_path)
    try:
        # The first call starts the child and cannot wait for it: the sender composes.
        assert ahead.start_claim([draft(1).to_json()]) is False
        assert ahead.next() is None
    finally:
        ahead.close()


def test_a_draft_that_cannot_be_composed_comes_back_as_its_error(tmp_path: Path) -> None:
    ahead = ComposeAhead(tmp_path)
    try:
        handed(ahead, ['{"version": 99}', draft(1).to_json()])
        error, mail = ahead.next(), ahead.next()
        assert isinstance(error, str) and "version" in error
        assert isinstance(mail, bytes) and b"<1.maildesk@desk.example>" in mail
    finally:
        ahead.close()


def test_a_dead_child_means_compose_it_yourself_and_the_next_claim_starts_another(
    tmp_path: Path,
) -> None:
    ahead = ComposeAhead(tmp_path)
    try:
        handed(ahead, [draft(1).to_json()])
        assert isinstance(ahead.next(), bytes)
        first = ahead.pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert ahead._process is not None
        ahead._process.wait(10)  # Dead for sure: the child's speed decides nothing below.
        # A claim handed to a dead child is the sender's to compose.
        assert ahead.start_claim([draft(2).to_json(), draft(3).to_json()]) is False
        assert ahead.next() is None
        # The next claim starts another child, and is composed by the sender until it is ready.
        assert ahead.start_claim([draft(4).to_json()]) is False
        assert ahead.pid() not in (None, first)
        assert ahead.next() is None
        handed(ahead, [draft(5).to_json()])
        assert isinstance(ahead.next(), bytes)
    finally:
        ahead.close()


def test_a_draft_with_a_large_file_comes_back_as_a_spool_file_dropped_if_unsent(
    tmp_path: Path,
) -> None:
    pdf = os.urandom(STREAM_BYTES + 1)
    digest = sha256_hex(pdf)
    content_path(tmp_path, ATTACHMENTS_DIR, digest).parent.mkdir(parents=True)
    content_path(tmp_path, ATTACHMENTS_DIR, digest).write_bytes(pdf)
    large = replace(draft(1), files=(DraftFile(digest, "application/pdf", "export.pdf"),))
    ahead = ComposeAhead(tmp_path)
    try:
        handed(ahead, [large.to_json(), large.to_json(), draft(2).to_json()])
        spooled = ahead.next()
        assert isinstance(spooled, Path) and spooled.parent == tmp_path / SPOOL_DIR
        [attached] = list(message_from_bytes(spooled.read_bytes(), policy=policy.default)
                          .iter_attachments())  # fmt: skip
        assert attached.get_content() == pdf
        spooled.unlink()  # As the sender does once it is sent.
        # The claim ends early: the next one drops the answers left, spool file included.
        handed(ahead, [draft(3).to_json()])
        assert list((tmp_path / SPOOL_DIR).iterdir()) == []
        assert isinstance(ahead.next(), bytes)
    finally:
        ahead.close()


def test_a_spool_that_cannot_be_written_is_a_temporary_failure(tmp_path: Path) -> None:
    pdf = os.urandom(STREAM_BYTES + 1)
    digest = sha256_hex(pdf)
    content_path(tmp_path, ATTACHMENTS_DIR, digest).parent.mkdir(parents=True)
    content_path(tmp_path, ATTACHMENTS_DIR, digest).write_bytes(pdf)
    (tmp_path / SPOOL_DIR).write_bytes(b"")  # A file where the spool directory should be.
    large = replace(draft(1), files=(DraftFile(digest, "application/pdf", "export.pdf"),))
    ahead = ComposeAhead(tmp_path)
    try:
        handed(ahead, [large.to_json()])
        answer = ahead.next()
        # Not the mail's fault: retried later, never given up on as a mail that cannot be made.
        assert isinstance(answer, TemporaryFailure) and "FileExistsError" in str(answer)
    finally:
        ahead.close()
