"""The files of the store: raw mails and attachments, kept on disk by their SHA-256.

Files are content-addressed (named by their SHA-256) and written before the transaction that
refers to them commits: a crash in between leaves at worst an unreferenced file, never a row
that points at nothing. Writing the same content twice is harmless.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from pathlib import Path

RAW_DIR = "raw"
ATTACHMENTS_DIR = "attachments"
SPOOL_DIR = "spool"  # Large attachments decoded by the parse, until filing moves them.


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of `data`, in hex."""
    return hashlib.sha256(data).hexdigest()


def write_once(path: Path, data: bytes) -> None:
    """Write `data` at `path` durably and atomically, unless it is already there."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def move_once(path: Path, source: Path) -> None:
    """Move the file `source` to `path` durably and atomically, unless `path` is there already."""
    if path.exists():
        source.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(source, path)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_spool(state_dir: Path, *, stale_seconds: float = 3600.0) -> Path:
    """The spool directory, where parsing decodes large attachments, emptied of stale files.

    A file is stale when no parse can still be using it: one left by a process that died.
    """
    spool = state_dir / SPOOL_DIR
    spool.mkdir(parents=True, exist_ok=True)
    too_old = time.time() - stale_seconds
    for entry in spool.iterdir():
        with contextlib.suppress(OSError):
            if entry.is_file() and entry.stat().st_mtime < too_old:
                entry.unlink()
    return spool


class RawWriter:
    """A raw mail written as it arrives, piece by piece, then kept under its SHA-256.

    Use it as a context manager: leaving it without `keep()` removes what was written.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        (state_dir / RAW_DIR).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=state_dir / RAW_DIR, prefix=".tmp-")
        self._path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, piece: bytes) -> None:
        """Append a piece of the mail."""
        self._file.write(piece)
        self._digest.update(piece)
        self.size += len(piece)

    def keep(self) -> tuple[str, str]:
        """Make the mail durable under its SHA-256: that, and its path relative to state_dir."""
        digest = self._digest.hexdigest()
        self._file.close()
        path = content_path(self.state_dir, RAW_DIR, digest)
        move_once(path, self._path)
        return digest, str(path.relative_to(self.state_dir))

    def __enter__(self) -> RawWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()
        self._path.unlink(missing_ok=True)  # Gone already once kept.


def content_path(state_dir: Path, kind: str, digest: str) -> Path:
    """Where the file with that digest lives."""
    return state_dir / kind / digest[:2] / digest


def save_raw(state_dir: Path, raw: bytes) -> tuple[str, str]:
    """Keep a raw mail; returns its SHA-256 and its path relative to the state directory."""
    digest = sha256_hex(raw)
    path = content_path(state_dir, RAW_DIR, digest)
    write_once(path, raw)
    return digest, str(path.relative_to(state_dir))


def read_raw(state_dir: Path, relative_path: str) -> bytes:
    """The raw mail kept at `relative_path`."""
    return (state_dir / relative_path).read_bytes()
