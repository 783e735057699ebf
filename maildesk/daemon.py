"""The daemon: start the stage tasks, stop them cleanly on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal

from maildesk import database
from maildesk.config import Settings
from maildesk.logs import get_logger

log = get_logger("daemon")


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run until `stop` is set."""
    engine = database.make_engine(settings.store_url)
    database.check_schema(engine)
    log.info(
        "started",
        desk=settings.desk.address,
        store=engine.dialect.name,
        imap=settings.imap.enabled,
        listener=settings.listener.enabled,
        transport=settings.smtp.transport,
    )
    try:
        await stop.wait()
    finally:
        engine.dispose()
        log.info("stopped")


def run_daemon(settings: Settings) -> int:
    """Run the daemon in the foreground until a signal asks it to stop."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, stop)

    asyncio.run(main())
    return 0
