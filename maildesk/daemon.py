"""The daemon: start the stage tasks, stop them cleanly on SIGTERM or SIGINT.

Intake (the IMAP fetcher, the SMTP/LMTP listener) hands each mail to the pipeline, which commits
it with its notifications in the outbox and wakes the sender. On a stop signal the listener
closes first, so no new mail is accepted, then each stage finishes the mail in hand.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from maildesk.config import Settings
from maildesk.ingress.fetch import ImapFetcher
from maildesk.ingress.listen import Listener
from maildesk.logs import get_logger
from maildesk.outbound.send import OutboxSender
from maildesk.pipeline import Pipeline
from maildesk.store import database

log = get_logger("daemon")

# Said once at start-up (and by `maildesk check`) when no MTA's verdicts are trusted.
TRUST_WARNING = (
    "no [security] trusted_authserv_id: agent actions rest on the signed reply address alone, "
    "and no sender's From is checked against SPF, DKIM or DMARC"
)


async def serve(settings: Settings, stop: asyncio.Event) -> bool:
    """Run every enabled stage until `stop` is set; False if a stage failed."""
    engine = database.make_engine(settings.store_url)
    database.check_schema(engine)
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    pipeline = Pipeline(
        settings, engine, on_commit=lambda: loop.call_soon_threadsafe(wake.set),
        parse_in_worker=True,
    )
    sender = OutboxSender(settings, engine)
    tasks = [asyncio.create_task(sender.run(stop, wake), name="send")]
    if settings.imap.enabled:
        fetcher = ImapFetcher(
            settings.imap, pipeline.process, pipeline.stored_uids,
            max_mail_bytes=settings.limits.max_mail_bytes,
        )  # fmt: skip
        tasks.append(asyncio.create_task(fetcher.run(stop), name="fetch"))
    listener: Listener | None = None
    if settings.listener.enabled:
        listener = Listener(
            settings.listener, settings.desk.address, pipeline.process,
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
        stop.set()
        # A mail being parsed is not waited for: its sender keeps it (451, or it stays in the
        # IMAP folder) and it is parsed again after the restart.
        pipeline.stop_parsing()
        if listener is not None:
            await listener.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        pipeline.close()
        engine.dispose()
        log.info("stopped")
    return not failed


def run_daemon(settings: Settings) -> int:
    """Run the daemon in the foreground until a signal asks it to stop."""
    # The pipeline's worker thread is CPU-bound while the sender's mostly waits on SMTP
    # replies; with the default 5 ms switch interval every reply waits that long for the GIL,
    # and a burst of incoming mail delays the acknowledgements by seconds.
    sys.setswitchinterval(0.0005)

    async def main() -> bool:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        return await serve(settings, stop)

    return 0 if asyncio.run(main()) else 1
