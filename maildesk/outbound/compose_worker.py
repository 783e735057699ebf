"""Compose a claim's drafts in a child process, ahead of the sender, on the other core.

Building the MIME form of a mail (compose.py) is CPU work in the email package: about 5 ms a
mail, as much as all of filing. In the daemon's process it competes for the GIL with the intake
runner; in a child it runs beside it. The sender hands the child every draft of a claim in one
message and reads the composed mails back one at a time, in order, while it sends the previous
one: the child is at most a claim ahead, and blocks on the pipe when the sender falls behind.

The drafts are ours (the child reads no hostile input that filing has not already bounded), so
the child needs no CPU budget; any failure of it (it died, a pipe broke, an answer is not one)
only makes the sender compose the rest of the claim itself, and the next claim starts a new
child. Like the parse worker, the child is a fresh interpreter started by subprocess.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from maildesk.child_process import start_child
from maildesk.logs import get_logger
from maildesk.outbound.compose_child import LATER, OK, READY, SPOOLED
from maildesk.outbound.transport import TemporaryFailure

log = get_logger("compose")

_CHILD_CODE = "from maildesk.outbound.compose_child import child_main; child_main()"
# A child is replaced once it has composed this much, so that the memory of large attachments
# goes back to the system.
RECYCLE_AFTER_BYTES = 64 * 2**20


def drop(answer: object) -> None:
    """Forget a composed mail that will not be sent: remove its spool file, if it has one."""
    if isinstance(answer, Path):
        answer.unlink(missing_ok=True)


class ComposeAhead:
    """A child process that composes the drafts of one claim at a time, in order."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._to_child: Connection | None = None
        self._from_child: Connection | None = None
        self._waiting = 0  # Answers of the current claim not yet read.
        self._composed = 0
        self._ready = False  # The child has imported what it needs and said so.

    def start_claim(self, drafts: Sequence[str | None]) -> bool:
        """Hand the child the drafts of a claim (None where a row has no draft); False if the
        sender should compose this claim itself (no child, or one still starting)."""
        self._drain()
        wanted = [d for d in drafts if d is not None]
        if not wanted:
            return False
        try:
            if self._to_child is None or self._composed > RECYCLE_AFTER_BYTES:
                self.close()
                self._start()
            assert self._to_child is not None and self._from_child is not None
            if not self._ready:
                # A child that is still starting would hold up the first mails after a
                # restart by its start-up: they are composed here meanwhile.
                if not self._from_child.poll(0):
                    return False
                self._ready = self._from_child.recv_bytes() == READY
                if not self._ready:
                    raise OSError("the compose child did not say it was ready")
            self._to_child.send_bytes(pickle.dumps((str(self.state_dir), wanted)))
            self._waiting = len(wanted)
            return True
        except (OSError, EOFError) as exc:
            log.warning("compose child unavailable, composing in the sender", error=str(exc))
            self.close()
            return False

    def next(self) -> bytes | Path | str | TemporaryFailure | None:
        """The next draft's mail, or the spool file holding it; an error text if it can never
        be composed, a TemporaryFailure if not now; None: compose it yourself (the child is
        gone)."""
        if self._waiting == 0 or self._from_child is None:
            return None
        try:
            answer = self._from_child.recv_bytes()
        except (EOFError, OSError) as exc:
            log.warning("compose child died, composing in the sender", error=str(exc))
            self.close()
            return None
        self._waiting -= 1
        self._composed += len(answer)
        if answer[:1] == OK:
            return answer[1:]
        if answer[:1] == SPOOLED:
            return Path(os.fsdecode(answer[1:]))
        reason = answer[1:].decode("utf-8", "replace")
        if answer[:1] == LATER:
            return TemporaryFailure(f"the mail cannot be composed now: {reason}")
        return reason

    def _drain(self) -> None:
        """Read and drop the answers left over from a claim that ended early."""
        while self._waiting and (answer := self.next()) is not None:
            drop(answer)
        self._waiting = 0

    def _start(self) -> None:
        # The parent's sys.path through the environment, so that the child imports the same
        # maildesk (a checkout, a venv) without running any script.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process, self._to_child, self._from_child = start_child(_CHILD_CODE, env)
        self._composed = 0
        self._ready = False

    def pid(self) -> int | None:
        """The child's process id, if one runs."""
        return self._process.pid if self._process is not None else None

    def close(self) -> None:
        """End the child, if any."""
        self._waiting = 0
        self._ready = False
        for conn in (self._to_child, self._from_child):
            if conn is not None:
                conn.close()
        self._to_child = self._from_child = None
        if self._process is not None:
            self._process.kill()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self._process = None
