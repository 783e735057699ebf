"""The daemon: start the stage tasks, stop them cleanly on SIGTERM or SIGINT.

Intake (the IMAP fetcher, the SMTP/LMTP listener) makes each mail durable and wakes the runner,
which files it through the pipeline with its notifications in the outbox and wakes the sender.
On a stop signal the listener closes first, so no new mail is accepted, then each stage
finishes the mail in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from maildesk.config import Settings
from maildesk.heap import return_freed_memory
from maildesk.ingress.fetch import LEASE_SECONDS, ImapFetcher
from maildesk.ingress.group_commit import GroupCommit
from maildesk.ingress.listen import Listener, ListenerError
from maildesk.lifecycle import run_ticket_clock
from maildesk.logs import get_logger
from maildesk.mail.message import Delivery
from maildesk.metrics import serve_metrics
from maildesk.ops import sdnotify
from maildesk.ops.messages import TRUST_WARNING
from maildesk.outbound.handoff import SendHandoff
from maildesk.outbound.send import LEASE as SEND_LEASE
from maildesk.outbound.send import OUTBOX_QUEUE, OutboxSender
from maildesk.pipeline import Pipeline
from maildesk.privacy.retention import run_daily
from maildesk.store import database
from maildesk.store.intake import Accepted, Arrival, IntakeStore
from maildesk.store.shared import take_lease

log = get_logger("daemon")

RETENTION_FIRST_DELAY_SECONDS = 300.0


async def serve(settings: Settings, stop: asyncio.Event) -> bool:
    """Run every enabled stage until `stop` is set; False if a stage failed."""
    engine = database.make_engine(settings.store_url)
    database.check_schema(engine)
    # Bound first: a port in use stops the start before any stage runs.
    metrics_server = _start_metrics(settings, engine)
    loop = asyncio.get_running_loop()

    def waker(event: asyncio.Event) -> Callable[[], object]:
        return lambda: loop.call_soon_threadsafe(event.set)

    # Stored mail wakes the runner; filed mail wakes the sender and the fetcher's moves.
    stored, queued, filed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    pipeline = Pipeline(settings, engine, on_commit=waker(queued), parse_in_worker=True)
    pipeline.runner.on_filed = waker(filed)
    intake = IntakeStore(engine, settings.desk.state_dir, on_stored=waker(stored),
                         handoff=pipeline.runner.handoff)  # fmt: skip
    owner = pipeline.runner.worker.owner
    handoff = SendHandoff(OUTBOX_QUEUE, owner, SEND_LEASE)
    pipeline.runner.send_handoff = handoff
    sender = OutboxSender(
        settings, engine, owner=owner,
        retry_base=timedelta(seconds=settings.smtp.retry_first_seconds),
        retry_most=timedelta(seconds=settings.smtp.retry_most_seconds),
        on_give_up=pipeline.notices.mail_given_up, compose_ahead=True,
        keep_connection=True, handoff=handoff,
    )
    tasks = [
        asyncio.create_task(sender.run(stop, queued), name="send"),
        asyncio.create_task(pipeline.runner.run(stop, stored), name="runner"),
    ]
    tasks.append(asyncio.create_task(_retention_later(settings, engine, stop), name="retention"))
    tasks.append(asyncio.create_task(
        run_ticket_clock(settings, engine, stop, notifier=pipeline.notifier), name="ticket-clock"
    ))
    if settings.imap.enabled:
        imap = settings.imap
        mailbox_name = f"imap:{imap.host}:{imap.port}:{imap.username}:{imap.folder}"

        def hold_mailbox() -> bool:
            return take_lease(engine, mailbox_name, owner, seconds=LEASE_SECONDS)

        fetcher = ImapFetcher(
            imap, intake, max_mail_bytes=settings.limits.max_mail_bytes, filed=filed,
            lease=hold_mailbox,
        )  # fmt: skip
        tasks.append(asyncio.create_task(fetcher.run(stop), name="fetch"))
    listener: Listener | None = None
    if settings.listener.enabled:
        group = GroupCommit(intake.store)

        async def accept(raw: bytes, delivery: Delivery) -> Accepted:
            return await group.submit(Arrival(raw, delivery))

        listener = Listener(
            settings.listener, settings.desk.address, accept,
            max_mail_bytes=settings.limits.max_mail_bytes,
        )  # fmt: skip
        await listener.start()
    log.info(
        "started",
        desk=settings.desk.address,
        store=engine.dialect.name,
        imap=settings.imap.enabled,
        listener=f"{settings.listener.host}:{listener.port}" if listener else None,
        transport=settings.smtp.transport,
    )
    sdnotify.notify("READY=1")
    tasks.append(asyncio.create_task(sdnotify.watchdog(stop), name="watchdog"))
    if not settings.security.trusted_authserv_id:
        log.warning(TRUST_WARNING)
    failed = False
    try:
        done, _pending = await asyncio.wait(
            [asyncio.create_task(stop.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED
        )
        for task in done:
            if task in tasks and task.exception() is not None:
                # A stage that died stops the daemon, so that systemd restarts it whole.
                failed = True
                log.error("stage failed", stage=task.get_name(), error=repr(task.exception()))
    finally:
        sdnotify.notify("STOPPING=1")
        stop.set()
        # A mail being parsed is not waited for: its sender keeps it (451, or it stays in the
        # IMAP folder) and it is parsed again after the restart.
        pipeline.stop_parsing()
        if listener is not None:
            await listener.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        pipeline.close()
        if metrics_server is not None:
            metrics_server.shutdown()
        engine.dispose()
        log.info("stopped")
    return not failed


def _start_metrics(settings: Settings, engine: sa.Engine) -> Any:
    """The Prometheus endpoint, when [metrics] listen asks for one."""
    listen = settings.metrics.listen
    if not listen:
        return None
    try:
        return serve_metrics(listen, engine)
    except OSError as exc:
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise ListenerError(f"[metrics] cannot listen on {listen}: {reason}") from None


async def _retention_later(settings: Settings, engine: sa.Engine, stop: asyncio.Event) -> None:
    """The daily retention run, first a few minutes after start-up, when intake has settled."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), RETENTION_FIRST_DELAY_SECONDS)
    if not stop.is_set():
        await run_daily(settings, engine, stop)


def run_daemon(settings: Settings) -> int:
    """Run the daemon in the foreground until a signal asks it to stop."""
    # The pipeline's worker thread is CPU-bound while the sender's mostly waits on SMTP
    # replies; with the default 5 ms switch interval every reply waits that long for the GIL,
    # and a burst of incoming mail delays the acknowledgements by seconds.
    sys.setswitchinterval(0.0005)
    return_freed_memory()

    async def main() -> bool:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        return await serve(settings, stop)

    try:
        return 0 if asyncio.run(main()) else 1
    except ListenerError as exc:
        # One line, as the CLI says its errors: a port in use is the operator's to fix.
        print(f"maildesk: error: {exc}", file=sys.stderr)
        return 1
