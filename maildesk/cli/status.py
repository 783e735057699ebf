"""`maildesk status`: the queues and the last day's traffic, for a person."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from maildesk.cli.output import print_json, table
from maildesk.config import Settings
from maildesk.metrics import queue_figures
from maildesk.store import database
from maildesk.store.models import InboundMail, Outbox, utcnow


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Print queue depths and ages, and what came in and went out in the last 24 hours."""
    engine = database.make_engine(settings.store_url)
    try:
        database.check_schema(engine)
        figures = queue_figures(engine)
        since = utcnow() - timedelta(days=1)
        inbound = InboundMail.metadata.tables["inboundmail"].c
        outbox = Outbox.metadata.tables["outbox"].c
        with engine.connect() as conn:
            came_in: dict[str, int] = dict(conn.execute(
                sa.select(inbound.outcome, sa.func.count())
                .where(inbound.received_at >= since).group_by(inbound.outcome)
            ).all())  # fmt: skip
            went_out: dict[str, int] = dict(conn.execute(
                sa.select(outbox.status, sa.func.count())
                .where(outbox.created_at >= since).group_by(outbox.status)
            ).all())  # fmt: skip
    finally:
        engine.dispose()
    if args.json:
        print_json({
            "queues": [{"queue": f.name, "depth": f.depth, "oldest_seconds": f.oldest_seconds}
                       for f in figures],
            "last_24h": {"in": came_in, "out": went_out},
        })  # fmt: skip
        return 0
    table([[f.name, f.depth, _age(f.oldest_seconds)] for f in figures],
          ["QUEUE", "WAITING", "OLDEST"])  # fmt: skip
    print()
    print("last 24 hours, in:  " + (", ".join(f"{k} {v}" for k, v in sorted(came_in.items()))
                                    or "nothing"))
    print("last 24 hours, out: " + (", ".join(f"{k} {v}" for k, v in sorted(went_out.items()))
                                    or "nothing"))
    return 0


def add_parsers(command: Any) -> None:
    """Add `status`."""
    sub = command("status", "show the queues and the last day's traffic", cmd_status)
    sub.add_argument("--json", action="store_true", help="print JSON")
