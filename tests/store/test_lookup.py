"""What the store tells the rules about a sender: an account counts only while it is active."""

from __future__ import annotations

from datetime import UTC, date, datetime

import sqlalchemy as sa

from maildesk.store import database, directory, lookup

PERSON = "claire@client.example"


def _setup(engine: sa.Engine) -> None:
    with database.session_scope(engine) as session:
        directory.add_company(session, name="Client SA", after_hours=False, actor="t")
        directory.add_account(session, email=PERSON, name="Claire", company="Client SA",
                              actor="t")
        directory.deactivate_account(session, email=PERSON, on=date(2027, 3, 1),
                                     timezone="Europe/Paris", actor="t")


def test_an_account_is_unknown_from_its_deactivation_date_in_paris(engine: sa.Engine) -> None:
    _setup(engine)
    with database.session_scope(engine) as session:
        before = lookup.directory_entry(session, PERSON, datetime(2027, 2, 28, 22, 59,
                                                                  tzinfo=UTC))
        at = lookup.directory_entry(session, PERSON, datetime(2027, 2, 28, 23, 0, tzinfo=UTC))
    assert before.account_active is True
    assert at.account_active is False
    assert at.account_id == before.account_id is not None


def test_an_account_of_an_inactive_company_is_inactive(engine: sa.Engine) -> None:
    with database.session_scope(engine) as session:
        directory.add_company(session, name="Client SA", after_hours=False, actor="t")
        directory.add_account(session, email=PERSON, name="Claire", company="Client SA",
                              actor="t")
    now = datetime(2027, 1, 1, tzinfo=UTC)
    with database.session_scope(engine) as session:
        assert lookup.directory_entry(session, PERSON, now).account_active is True
        directory.update_company(session, name="Client SA", active=False, actor="t")
    with database.session_scope(engine) as session:
        assert lookup.directory_entry(session, PERSON, datetime.now(UTC)).account_active is False
