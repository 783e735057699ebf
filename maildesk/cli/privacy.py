"""The `privacy` commands (to be written)."""

from __future__ import annotations

from typing import Any


def add_parsers(command: Any) -> None:
    """Add this module's commands to the parser (none yet)."""
