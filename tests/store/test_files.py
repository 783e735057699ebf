"""The store's files: moving a spooled attachment into place, and the spool's clean-up."""

from __future__ import annotations

import os
import time
from pathlib import Path

from maildesk.store.files import (
    ATTACHMENTS_DIR,
    RAW_DIR,
    SPOOL_DIR,
    RawWriter,
    content_path,
    move_once,
    prepare_spool,
)


def test_a_spool_file_moves_into_its_content_path_once(tmp_path: Path) -> None:
    target = content_path(tmp_path, ATTACHMENTS_DIR, "ab" * 32)
    (first := tmp_path / "part-1").write_bytes(b"content")
    move_once(target, first)
    assert (target.read_bytes(), first.exists()) == (b"content", False)
    # The same content again (another mail with the same file): the spool copy just goes.
    (second := tmp_path / "part-2").write_bytes(b"content")
    move_once(target, second)
    assert (target.read_bytes(), second.exists()) == (b"content", False)


def test_preparing_the_spool_removes_only_files_left_for_over_an_hour(tmp_path: Path) -> None:
    spool = prepare_spool(tmp_path)
    assert spool == tmp_path / SPOOL_DIR and spool.is_dir()
    (stale := spool / "part-stale").write_bytes(b"left by a dead child")
    (fresh := spool / "part-fresh").write_bytes(b"a parse in progress")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    prepare_spool(tmp_path)
    assert (stale.exists(), fresh.exists()) == (False, True)


def test_a_raw_writer_keeps_the_mail_under_its_digest_or_leaves_nothing(tmp_path: Path) -> None:
    with RawWriter(tmp_path) as writer:
        writer.write(b"From: a@b.example\r\n\r\n")
        writer.write(b"body\r\n")
        digest, relative = writer.keep()
    assert (tmp_path / relative).read_bytes() == b"From: a@b.example\r\n\r\nbody\r\n"
    assert (tmp_path / relative) == content_path(tmp_path, RAW_DIR, digest)
    with RawWriter(tmp_path) as abandoned:
        abandoned.write(b"half a mail")  # The server went away: no keep().
    assert sorted(p.name for p in (tmp_path / RAW_DIR).iterdir()) == [digest[:2]]
