"""What several instances of one desk share through the database: secrets and leases.

Instances on one PostgreSQL must sign and check reply addresses with the same key, so a key made
at first use lives in the database, never in a per-host file. Work that only one instance may do
at a time (reading one mailbox) is held under a lease measured on the database's clock: its
holder renews it, and another instance takes it over once it has lapsed.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from maildesk.store.models import DeskSecret, Lease, utcnow
from maildesk.store.queue import Clock, database_time

_SECRET = DeskSecret.metadata.tables["desksecret"]
_LEASE = Lease.metadata.tables["lease"]


def _insert(engine: sa.Engine, table: sa.Table) -> Any:
    # Imported here: each dialect's module costs the daemon megabytes (PostgreSQL's 2.4 MiB),
    # and the engine has loaded its own already.
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table)


def desk_secret(
    engine: sa.Engine, name: str, make: Callable[[], str] = lambda: secrets.token_hex(32)
) -> str:
    """The shared secret `name`, made by `make` (once, whichever instance comes first)."""
    with engine.begin() as conn:
        found = conn.execute(sa.select(_SECRET.c.value).where(_SECRET.c.name == name)).scalar()
        if found is not None:
            return str(found)
        conn.execute(
            _insert(engine, _SECRET)
            .values(name=name, value=make(), created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["name"])
        )
        query = sa.select(_SECRET.c.value).where(_SECRET.c.name == name)
        return str(conn.execute(query).scalar_one())


def take_lease(
    engine: sa.Engine, name: str, holder: str, *, seconds: float, clock: Clock | None = None
) -> bool:
    """Take or renew the lease `name` for `seconds`; False while another holder has it."""
    until = database_time(engine, timedelta(seconds=seconds), clock)
    now = database_time(engine, timedelta(0), clock)
    with engine.begin() as conn:
        conn.execute(
            _insert(engine, _LEASE)
            .values(name=name, holder=holder, until=until)
            .on_conflict_do_nothing(index_elements=["name"])
        )
        taken = conn.execute(
            sa.update(_LEASE)
            .where(_LEASE.c.name == name,
                   sa.or_(_LEASE.c.holder == holder, _LEASE.c.until < now))
            .values(holder=holder, until=until)
        )  # fmt: skip
    return bool(taken.rowcount)


def drop_lease(engine: sa.Engine, name: str, holder: str) -> None:
    """Give the lease up at once, if this holder has it (a clean stop)."""
    with engine.begin() as conn:
        conn.execute(sa.delete(_LEASE).where(_LEASE.c.name == name, _LEASE.c.holder == holder))
