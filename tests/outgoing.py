"""An Outbox row's mail as the sender puts it on the wire, for tests that read queued mail."""

from __future__ import annotations

from pathlib import Path

from maildesk.outbound.compose import outgoing_bytes
from maildesk.store.models import Outbox

# Tests whose mails carry no attachment need no state directory: nothing is read from it.
_NO_FILES = Path("/nonexistent/maildesk-test-state")


def composed(row: Outbox, state_dir: Path | None = None) -> bytes:
    """The row's MIME bytes: composed from its draft, attachments read under `state_dir`."""
    return outgoing_bytes(row.raw, row.draft, state_dir or _NO_FILES)
