"""The errors that a command raises to end with one line and exit code 1."""

from __future__ import annotations


class CommandError(Exception):
    """A command that failed in a way the user can act on."""


class NotFound(CommandError):
    """The ticket, mail or row asked for does not exist."""
