"""Metrics: Prometheus counters and histograms that the stages update, and queue gauges read
from the database at each scrape.

The endpoint is off unless `[metrics] listen` names an address. `maildesk status` prints the
same queue figures for a person (see `queue_figures`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from maildesk.store.models import RECEIVED, InboundMail, Outbox, utcnow

REGISTRY = CollectorRegistry(auto_describe=True)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)

MAILS_STORED = Counter(
    "maildesk_mails_stored", "Mails made durable by intake, by source.", ["source"],
    registry=REGISTRY,
)
MAILS_FILED = Counter(
    "maildesk_mails_filed", "Mails filed by the intake runner, by outcome.", ["outcome"],
    registry=REGISTRY,
)
SEND_RESULTS = Counter(
    "maildesk_send_results", "Attempts to deliver outgoing mail, by result.", ["result"],
    registry=REGISTRY,
)
IMAP_RECONNECTS = Counter(
    "maildesk_imap_reconnects", "IMAP connections lost or refused, then tried again.",
    registry=REGISTRY,
)
FILING_SECONDS = Histogram(
    "maildesk_filing_seconds", "From a mail made durable to its filing committed.",
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
DELIVERY_SECONDS = Histogram(
    "maildesk_delivery_seconds", "From an outgoing mail queued to the relay's acceptance.",
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)


@dataclass(frozen=True)
class QueueFigure:
    """One queue's depth and the age of its oldest row, in seconds."""

    name: str
    depth: int
    oldest_seconds: float | None


def _oldest_age(oldest: datetime | None, now: datetime) -> float | None:
    return max(0.0, (now - oldest).total_seconds()) if oldest is not None else None


def queue_figures(engine: sa.Engine) -> list[QueueFigure]:
    """Intake waiting to be filed, outgoing mail waiting to leave, and outgoing mail failed."""
    inbound = InboundMail.metadata.tables["inboundmail"].c
    outbox = Outbox.metadata.tables["outbox"].c
    now = utcnow()
    queries = [
        ("intake", sa.select(sa.func.count(), sa.func.min(inbound.received_at))
         .where(inbound.outcome == RECEIVED)),
        ("outbox", sa.select(sa.func.count(), sa.func.min(outbox.created_at))
         .where(outbox.status.in_(("pending", "sending")))),
        ("outbox_failed", sa.select(sa.func.count(), sa.func.min(outbox.created_at))
         .where(outbox.status == "failed")),
    ]  # fmt: skip
    figures = []
    with engine.connect() as conn:
        for name, query in queries:
            count, oldest = conn.execute(query).one()
            if isinstance(oldest, str):  # SQLite returns an aggregate's timestamp as text.
                oldest = datetime.fromisoformat(oldest).replace(tzinfo=now.tzinfo)
            figures.append(QueueFigure(name, int(count), _oldest_age(oldest, now)))
    return figures


class QueueCollector(Collector):
    """Reads the queues' depth and oldest age from the database at each scrape."""

    def __init__(self, engine: sa.Engine) -> None:
        """Read from `engine`."""
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        """The gauges; none when the database cannot be read (the scrape still answers)."""
        depth = GaugeMetricFamily("maildesk_queue_depth", "Rows waiting in a queue.",
                                  labels=["queue"])  # fmt: skip
        age = GaugeMetricFamily("maildesk_queue_oldest_seconds",
                                "Age of the oldest row waiting in a queue.", labels=["queue"])
        try:
            figures = queue_figures(self.engine)
        except sa.exc.SQLAlchemyError:
            return
        for figure in figures:
            depth.add_metric([figure.name], figure.depth)
            if figure.oldest_seconds is not None:
                age.add_metric([figure.name], figure.oldest_seconds)
        yield depth
        yield age


def parse_listen(listen: str) -> tuple[str, int]:
    """"host:port" (or "[v6]:port") as a host and a port."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve_metrics(listen: str, engine: sa.Engine) -> Any:
    """Start the text endpoint in a thread; returns the server, to shut down on stop."""
    REGISTRY.register(QueueCollector(engine))
    host, port = parse_listen(listen)
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return server
