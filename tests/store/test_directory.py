"""The directory: companies, accounts and agents, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlmodel import Session, col, select

from maildesk.store import database, directory
from maildesk.store.directory import DirectoryError
from maildesk.store.models import Account, AuditEvent, Company


def test_emails_are_unique_whatever_their_case(engine: sa.Engine) -> None:
    with database.session_scope(engine) as session:
        directory.add_company(session, name="ACME SA", after_hours=False, actor="t")
        account = directory.add_account(
            session, email="Claire.Dupont@Client.Example", name="Claire", company="acme sa",
            actor="t",
        )
        assert account.email == "claire.dupont@client.example"
    with database.session_scope(engine) as session, pytest.raises(DirectoryError):
        directory.add_account(
            session, email="CLAIRE.DUPONT@client.example", name="C", company="ACME SA", actor="t"
        )
    # The database enforces it too, should a caller skip the directory.
    with pytest.raises(sa.exc.IntegrityError), database.session_scope(engine) as session:
        company = directory.find_company(session, "ACME SA")
        assert company is not None
        session.add(Account(email="claire.dupont@client.example", name="x",
                            company_id=company.id))  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "   ", "claire", "claire@", "@client.example",
                                 "claire@localhost", "a b@client.example", "x@y@z.example"])
def test_email_is_mandatory_and_valid(bad: str) -> None:
    with pytest.raises(DirectoryError):
        directory.normalise_email(bad)


def test_timestamps_come_back_in_utc(engine: sa.Engine) -> None:
    on = datetime(2026, 3, 1, 12, 0, tzinfo=UTC) + timedelta(hours=0)
    with database.session_scope(engine) as session:
        directory.add_company(session, name="ACME SA", after_hours=False, actor="t")
        directory.add_account(session, email="a@client.example", name="A", company="ACME SA",
                              actor="t")
        directory.deactivate_account(session, email="a@client.example", on=on, actor="t")
    with database.session_scope(engine) as session:
        account = directory.get_account(session, "a@client.example")
        assert account.deactivated_at == on
        assert account.deactivated_at is not None and account.deactivated_at.tzinfo is not None
        assert account.created_at.tzinfo is not None
        assert not directory.account_is_active(account)
        assert directory.account_is_active(account, now=on - timedelta(days=1))


def test_us_agents_see_only_after_hours_companies(engine: sa.Engine) -> None:
    with database.session_scope(engine) as session:
        day = directory.add_company(session, name="Day Co", after_hours=False, actor="t")
        night = directory.add_company(session, name="Night Co", after_hours=True, actor="t")
        directory.add_agent(session, email="eu@vendor.example", name="EU", region="eu", actor="t")
        directory.add_agent(session, email="us@vendor.example", name="US", region="us", actor="t")
        directory.add_agent(session, email="old@vendor.example", name="Old", region="eu",
                            actor="t")
        directory.deactivate_agent(session, email="old@vendor.example", actor="t")
        assert [a.email for a in directory.agents_for(session, day)] == ["eu@vendor.example"]
        assert [a.email for a in directory.agents_for(session, night)] == [
            "eu@vendor.example", "us@vendor.example",
        ]


def test_every_change_is_audited_without_personal_values(engine: sa.Engine) -> None:
    with database.session_scope(engine) as session:
        directory.add_company(session, name="ACME SA", after_hours=False, actor="cli:root")
        directory.add_account(session, email="a@client.example", name="Anne", company="ACME SA",
                              phone="+33 6", actor="cli:root")
        directory.update_account(session, email="a@client.example", name="Anne-Marie",
                                 phone="+33 7", actor="cli:root")
    with database.session_scope(engine) as session:
        events = session.exec(select(AuditEvent).order_by(AuditEvent.id)).all()  # type: ignore[arg-type]
        assert [e.action for e in events] == ["company.add", "account.add", "account.update"]
        assert all(e.actor == "cli:root" for e in events)
        assert events[2].detail is not None
        assert "Anne-Marie" not in events[2].detail and "+33 7" not in events[2].detail


def test_a_rejected_import_leaves_nothing(engine: sa.Engine) -> None:
    with database.session_scope(engine) as session:
        directory.add_company(session, name="ACME SA", after_hours=False, actor="t")
    data = "email,name,company\nok@client.example,Ok,ACME SA\nbad,Bad,ACME SA\n"
    with pytest.raises(DirectoryError, match=r"f\.csv: line 3"), \
            database.session_scope(engine) as session:
        directory.import_accounts(session, data, source="f.csv", actor="t")
    with database.session_scope(engine) as session:
        assert session.exec(select(Account)).all() == []
        assert len(session.exec(select(Company)).all()) == 1


def _company_with_accounts(session: Session, *emails: str) -> None:
    directory.add_company(session, name="Paris SA", after_hours=False, actor="t")
    for email in emails:
        directory.add_account(session, email=email, name="P", company="Paris SA", actor="t")


def test_a_deactivation_date_starts_at_midnight_in_the_desks_time_zone(
    engine: sa.Engine,
) -> None:
    with database.session_scope(engine) as session:
        _company_with_accounts(session, "a@client.example")
        directory.deactivate_account(session, email="a@client.example", on=date(2027, 3, 1),
                                     timezone="Europe/Paris", actor="t")
    with database.session_scope(engine) as session:
        account = directory.get_account(session, "a@client.example")
        assert account.deactivated_at == datetime(2027, 2, 28, 23, 0, tzinfo=UTC)
        assert directory.account_is_active(account, datetime(2027, 2, 28, 22, 59, tzinfo=UTC))
        assert not directory.account_is_active(account, datetime(2027, 2, 28, 23, 0, tzinfo=UTC))
        # In summer Paris is two hours ahead of UTC.
        directory.add_account(session, email="b@client.example", name="B",
                              company="Paris SA", actor="t")
        summer = directory.deactivate_account(session, email="b@client.example",
                                              on=date(2027, 7, 1), actor="t")
        assert summer.deactivated_at == datetime(2027, 6, 30, 22, 0, tzinfo=UTC)


def test_deactivating_twice_keeps_the_first_date(engine: sa.Engine) -> None:
    with database.session_scope(engine) as session:
        _company_with_accounts(session, "a@client.example")
        directory.deactivate_account(session, email="a@client.example", on=date(2027, 3, 1),
                                     actor="t")
    with database.session_scope(engine) as session:
        again = directory.deactivate_account(session, email="a@client.example",
                                             on=date(2027, 6, 1), actor="t")
        assert again.deactivated_at == datetime(2027, 2, 28, 23, 0, tzinfo=UTC)
        now = directory.deactivate_account(session, email="a@client.example", actor="t")
        assert now.deactivated_at == datetime(2027, 2, 28, 23, 0, tzinfo=UTC)
    with database.session_scope(engine) as session:
        events = session.exec(select(AuditEvent).where(
            AuditEvent.action == "account.deactivate")).all()
        assert len(events) == 1


def test_deactivating_a_company_deactivates_its_accounts(engine: sa.Engine) -> None:
    earlier = datetime(2026, 5, 1, tzinfo=UTC)
    with database.session_scope(engine) as session:
        _company_with_accounts(session, "a@client.example", "b@client.example")
        directory.add_company(session, name="Other SA", after_hours=False, actor="t")
        directory.add_account(session, email="o@other.example", name="O", company="Other SA",
                              actor="t")
        directory.deactivate_account(session, email="b@client.example", on=earlier, actor="t")
        directory.update_company(session, name="Paris SA", active=False, actor="t")
    with database.session_scope(engine) as session:
        a = directory.get_account(session, "a@client.example")
        b = directory.get_account(session, "b@client.example")
        other = directory.get_account(session, "o@other.example")
        assert a.deactivated_at is not None and not directory.account_is_active(a)
        # One deactivated before keeps its own date: its retention started then.
        assert b.deactivated_at == earlier
        assert other.deactivated_at is None and directory.account_is_active(other)


def test_an_account_can_be_reactivated_once_its_company_is_active(engine: sa.Engine) -> None:
    with database.session_scope(engine) as session:
        _company_with_accounts(session, "a@client.example")
        directory.update_company(session, name="Paris SA", active=False, actor="t")
    with database.session_scope(engine) as session, pytest.raises(
        DirectoryError, match='company "Paris SA" is inactive'
    ):
        directory.reactivate_account(session, email="a@client.example", actor="t")
    with database.session_scope(engine) as session:
        directory.update_company(session, name="Paris SA", active=True, actor="t")
        # Reactivating the company gives nobody their access back by itself.
        assert not directory.account_is_active(directory.get_account(session,
                                                                     "a@client.example"))
        account = directory.reactivate_account(session, email="a@client.example", actor="t")
        assert account.deactivated_at is None and directory.account_is_active(account)
    with database.session_scope(engine) as session:
        assert directory.account_is_active(directory.get_account(session, "a@client.example"))
        with pytest.raises(DirectoryError, match="is not deactivated"):
            directory.reactivate_account(session, email="a@client.example", actor="t")
        # Deactivated again after a reactivation, it gets the new date.
        again = directory.deactivate_account(session, email="a@client.example",
                                             on=date(2028, 1, 10), actor="t")
        assert again.deactivated_at == datetime(2028, 1, 9, 23, 0, tzinfo=UTC)
        actions = [e.action for e in session.exec(select(AuditEvent).order_by(
            col(AuditEvent.id)))]
        assert "account.reactivate" in actions
