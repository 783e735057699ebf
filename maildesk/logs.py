"""Logging: structlog, JSON lines when not on a terminal, the console renderer on one.

Log lines carry ids and outcomes, never a password and never a message body: the processor
below drops any key that looks like a secret, as a last guard against a careless call.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_WORDS = ("password", "secret", "key", "token", "body", "text", "html")


def _drop_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace the values of keys that name a secret or a body."""
    for name in list(event):
        if name != "event" and any(word in name.lower() for word in _SECRET_WORDS):
            event[name] = "[redacted]"
    return event


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Set up structlog for the process; JSON unless stdout is a terminal."""
    if json is None:
        json = not sys.stdout.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A structlog logger bound to a component name."""
    return structlog.get_logger().bind(component=name)
