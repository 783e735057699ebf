"""The compose child's own side (see compose_worker.py): light to import, so it starts fast."""

from __future__ import annotations

import os
import pickle
import signal
import sys
from multiprocessing.connection import Connection
from pathlib import Path

from maildesk.heap import return_freed_memory
from maildesk.outbound.compose import Draft, compose

# An answer: the mail's bytes after OK, the path of a spool file holding them after SPOOLED (a
# mail carrying a large file), why it can never be composed after FAILED, or why not now (the
# spool could not be written: a full disk, say) after LATER.
OK, FAILED, SPOOLED, LATER, READY = b"\x00", b"\x01", b"\x02", b"\x03", b"ready"


def child_main() -> None:
    """The child: compose each claim's drafts and send each mail back as soon as it is built."""
    # Only the parent ends a child: systemd's SIGTERM to the unit must not cut a claim short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return_freed_memory()
    incoming = Connection(int(sys.argv[1]), writable=False)
    outgoing = Connection(int(sys.argv[2]), readable=False)
    outgoing.send_bytes(READY)
    while True:
        try:
            request = incoming.recv_bytes()
        except EOFError:
            return
        state_dir, drafts = pickle.loads(request)  # noqa: S301 (from the parent)
        for text in drafts:
            try:
                mail = compose(Draft.from_json(text), Path(state_dir))
                answer = SPOOLED + os.fsencode(mail) if isinstance(mail, Path) else OK + mail
            except OSError as exc:
                answer = LATER + f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
            except Exception as exc:
                answer = FAILED + f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
            outgoing.send_bytes(answer)
