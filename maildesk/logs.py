"""Logging: structlog, JSON lines or the console renderer ([log] format; by default
JSON when not on a terminal, the console renderer on one).

Log lines carry ids and outcomes, never a password and never a message body: the processor
below drops any key that looks like a secret, as a last guard against a careless call.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, TextIO


def _import_structlog_without_rich() -> Any:
    """Import structlog with rich hidden, where nothing in the process has imported it yet.

    structlog.dev imports rich (and pygments through it) whenever they are installed, only to
    draw exceptions on a terminal. Our processors turn an exception into text before any
    renderer sees it (format_exc_info below), so rich would be dead weight: 2.8 MiB in every
    daemon that runs where it happens to be installed (a development environment has it for
    import-linter). The name is hidden only while structlog is imported.
    """
    if "structlog" in sys.modules or "rich" in sys.modules:
        import structlog

        return structlog
    sys.modules["rich"] = None  # type: ignore[assignment]  # makes "import rich" fail
    try:
        import structlog
    finally:
        del sys.modules["rich"]
    return structlog


if TYPE_CHECKING:
    import structlog
else:
    structlog = _import_structlog_without_rich()

_SECRET_WORDS = ("password", "secret", "key", "token", "body", "text", "html")


def _drop_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace the values of keys that name a secret or a body."""
    for name in list(event):
        if name != "event" and any(word in name.lower() for word in _SECRET_WORDS):
            event[name] = "[redacted]"
    return event


# A signed reply address's token (support+t12-a-<hex>@…) is a credential for its ticket, and a
# VERP token names one outgoing mail: neither may reach a log, whatever the value it sits in.
_TOKEN = re.compile(r"\+(t\d{1,12}-[a-z0-9]{1,8}-[0-9a-f]{6,}|bounce-[0-9a-f]{6,})", re.I)


def redact_tokens(value: str) -> str:
    """The text with every reply or VERP token replaced by a marker."""
    return _TOKEN.sub("+[token]", value)


def _drop_tokens(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Redact reply and VERP tokens in every string value, the exception text included."""
    for name, value in list(event.items()):
        if isinstance(value, str) and "+" in value:
            event[name] = redact_tokens(value)
    return event


def configure_logging(
    level: str = "info", *, json: bool | None = None, log_format: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Set up structlog for the process: `log_format` ("json" or "console", [log] format),
    else JSON unless the log's stream (default stdout) is a terminal.
    """
    out = stream or sys.stdout
    if json is None:
        json = log_format == "json" if log_format else not out.isatty()
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
            _drop_tokens,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A structlog logger bound to a component name."""
    # A lazy proxy: modules create their loggers at import, often before configure_logging()
    # ran, and a logger bound then would keep structlog's defaults (console, stdout) for good.
    return structlog.get_logger(component=name)
