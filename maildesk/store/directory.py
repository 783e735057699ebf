"""The directory: customer companies, their authorised people (accounts), and the agents.

Only the people a company authorised may open tickets, and email is mandatory: every account
is created here, from the CLI or from the CSV file that the company sends, and every change
leaves an audit event.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from email.errors import HeaderParseError
from email.headerregistry import Address
from typing import Any
from zoneinfo import ZoneInfo

from sqlmodel import Session, col, func, select

from maildesk.mail.htmltext import clean_text
from maildesk.store.models import Account, Agent, AuditEvent, Company, utcnow

LOCALES = ("fr", "en")
REGIONS = ("eu", "us")
CSV_COLUMNS = ("email", "name", "company", "phone", "locale")


class DirectoryError(Exception):
    """A request that the directory refuses; the message says why."""


def normalise_email(value: str | None) -> str:
    """Check an email address and return it lowercased; raise DirectoryError if invalid."""
    text = (value or "").strip()
    if not text:
        raise DirectoryError("email is missing (it is mandatory)")
    try:
        address = Address(addr_spec=text)
    except (HeaderParseError, ValueError, IndexError):
        raise DirectoryError(f'"{text}" is not a valid email address') from None
    if not address.username or "." not in address.domain or address.addr_spec != text:
        raise DirectoryError(f'"{text}" is not a valid email address')
    return text.lower()


def _audit(session: Session, action: str, actor: str, **fields: Any) -> None:
    account_id = fields.pop("account_id", None)
    session.add(
        AuditEvent(
            actor=actor,
            action=action,
            account_id=account_id,
            detail=json.dumps(fields, ensure_ascii=False, default=str) if fields else None,
        )
    )


# Companies


def find_company(session: Session, name: str) -> Company | None:
    """The company of that name, compared case-insensitively."""
    wanted = clean_text(name, multiline=False).lower()
    query = select(Company).where(func.lower(Company.name) == wanted)
    return session.exec(query).first()


def add_company(session: Session, *, name: str, after_hours: bool, actor: str) -> Company:
    """Create a company."""
    name = clean_text(name, multiline=False)
    if not name:
        raise DirectoryError("company name is empty")
    if find_company(session, name):
        raise DirectoryError(f'company "{name}" already exists')
    company = Company(name=name, after_hours=after_hours)
    session.add(company)
    session.flush()
    _audit(session, "company.add", actor, company=name, after_hours=after_hours)
    return company


def update_company(
    session: Session,
    *,
    name: str,
    after_hours: bool | None = None,
    active: bool | None = None,
    actor: str,
) -> Company:
    """Change a company's after-hours subscription or active flag."""
    company = find_company(session, name)
    if company is None:
        raise DirectoryError(f'no company named "{name}"')
    changes: dict[str, Any] = {}
    if after_hours is not None and after_hours != company.after_hours:
        company.after_hours = after_hours
        changes["after_hours"] = after_hours
    if active is not None and active != company.active:
        company.active = active
        changes["active"] = active
    if changes:
        session.add(company)
        _audit(session, "company.update", actor, company=company.name, **changes)
    if active is False:
        # The company's people lose their access with it, and their retention starts; those
        # deactivated before keep their own date. Reactivating the company reactivates nobody:
        # each account is reactivated on its own (accounts reactivate).
        for account in session.exec(select(Account).where(
            Account.company_id == company.id, col(Account.deactivated_at).is_(None)
        )):
            deactivate_account(session, email=account.email, actor=actor)
    return company


def list_companies(session: Session) -> list[Company]:
    """All companies by name."""
    return list(session.exec(select(Company).order_by(Company.name)))


# Accounts


def find_account(session: Session, email: str) -> Account | None:
    """The account with that email address, compared case-insensitively."""
    return session.exec(select(Account).where(Account.email == email.strip().lower())).first()


def get_account(session: Session, email: str) -> Account:
    """The account with that email address, or DirectoryError."""
    account = find_account(session, email)
    if account is None:
        raise DirectoryError(f"no account with email {email.strip()}")
    return account


def _check_locale(locale: str) -> str:
    if locale not in LOCALES:
        raise DirectoryError(f'locale must be one of {", ".join(LOCALES)}, not "{locale}"')
    return locale


def add_account(
    session: Session,
    *,
    email: str,
    name: str,
    company: str,
    phone: str | None = None,
    locale: str = "fr",
    actor: str,
) -> Account:
    """Create an account for a person that `company` authorised."""
    address = normalise_email(email)
    if not clean_text(name, multiline=False):
        raise DirectoryError("name is missing")
    owner = find_company(session, company)
    if owner is None:
        raise DirectoryError(f'no company named "{company.strip()}"')
    if find_account(session, address):
        raise DirectoryError(f"an account with email {address} already exists")
    account = Account(
        email=address,
        name=clean_text(name, multiline=False),
        phone=(phone or "").strip() or None,
        company_id=owner.id,  # type: ignore[arg-type]
        locale=_check_locale(locale),
    )
    session.add(account)
    session.flush()
    _audit(session, "account.add", actor, account_id=account.id, company=owner.name)
    return account


def update_account(
    session: Session,
    *,
    email: str,
    name: str | None = None,
    new_email: str | None = None,
    phone: str | None = None,
    locale: str | None = None,
    actor: str,
) -> Account:
    """Rectify an account's data."""
    account = get_account(session, email)
    changed: list[str] = []
    if new_email is not None:
        address = normalise_email(new_email)
        if address != account.email:
            if find_account(session, address):
                raise DirectoryError(f"an account with email {address} already exists")
            account.email = address
            changed.append("email")
    if name is not None:
        if not clean_text(name, multiline=False):
            raise DirectoryError("name is missing")
        account.name = clean_text(name, multiline=False)
        changed.append("name")
    if phone is not None:
        account.phone = phone.strip() or None
        changed.append("phone")
    if locale is not None:
        account.locale = _check_locale(locale)
        changed.append("locale")
    if changed:
        session.add(account)
        # The audit trail records which fields changed, not their values: it must not become
        # a second copy of the personal data that rectification is meant to correct.
        _audit(session, "account.update", actor, account_id=account.id, fields=changed)
    return account


def start_of_day(day: date, timezone: str) -> datetime:
    """The moment `day` begins in `timezone` (an IANA name), in UTC."""
    return datetime.combine(day, time(), ZoneInfo(timezone)).astimezone(UTC)


def deactivate_account(
    session: Session, *, email: str, on: date | datetime | None = None,
    timezone: str = "Europe/Paris", actor: str,
) -> Account:
    """Deactivate an account now, or from a day (in `timezone`); retention counts from then.

    An account already deactivated keeps its first date: retention must not restart, nor the
    person get back in between, because the same departure was recorded twice.
    """
    account = get_account(session, email)
    if account.deactivated_at is not None:
        return account
    if isinstance(on, datetime):
        when = on
    elif on is not None:
        when = start_of_day(on, timezone)
    else:
        when = utcnow()
    account.deactivated_at = when
    session.add(account)
    _audit(session, "account.deactivate", actor, account_id=account.id, on=when)
    return account


def reactivate_account(session: Session, *, email: str, actor: str) -> Account:
    """Let a deactivated account open tickets again (its company must be active)."""
    account = get_account(session, email)
    company = session.get(Company, account.company_id)
    if company is not None and not company.active:
        raise DirectoryError(
            f'the company "{company.name}" is inactive; reactivate it first '
            "(companies update --active)"
        )
    if account.deactivated_at is None:
        raise DirectoryError(f"the account {account.email} is not deactivated")
    account.deactivated_at = None
    session.add(account)
    _audit(session, "account.reactivate", actor, account_id=account.id)
    return account


def list_accounts(session: Session, company: str | None = None) -> list[tuple[Account, Company]]:
    """Accounts with their companies, optionally of one company."""
    query = select(Account, Company).join(Company).order_by(Company.name, Account.email)
    if company is not None:
        query = query.where(func.lower(Company.name) == company.strip().lower())
    return list(session.exec(query))  # type: ignore[arg-type]


def account_is_active(
    account: Account, now: datetime | None = None, company: Company | None = None
) -> bool:
    """Whether the account may open tickets at `now` (and its company, when given, is active).

    From the first moment of its deactivation date on, an account counts as unknown.
    """
    if company is not None and not company.active:
        return False
    return account.deactivated_at is None or account.deactivated_at > (now or utcnow())


# CSV import


@dataclass(frozen=True)
class ImportResult:
    """What an import did: accounts created, and rows that were already there unchanged."""

    created: int
    unchanged: int
    # The accounts created, for the welcome mail that each of them gets.
    accounts: tuple[Account, ...] = ()


def import_accounts(session: Session, data: str, *, source: str, actor: str) -> ImportResult:
    """Import the CSV a company sends; one bad row rejects the whole file.

    The caller's transaction holds every insert, so a rejected file leaves nothing behind.
    Rows equal to an existing account are skipped, so re-importing a file changes nothing.
    """
    reader = csv.DictReader(io.StringIO(data.removeprefix("\ufeff")))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if "email" not in header or "name" not in header or "company" not in header:
        raise DirectoryError(
            f"{source}: line 1: the header must name the columns email, name, company "
            f"(and optionally phone, locale); got {', '.join(header) or 'nothing'}"
        )
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown:
        raise DirectoryError(f"{source}: line 1: unknown column {unknown[0]}")
    reader.fieldnames = header
    seen: dict[str, int] = {}
    created = unchanged = 0
    new_accounts: list[Account] = []
    for row in reader:
        line = reader.line_num
        values = {key: (value or "").strip() for key, value in row.items() if key is not None}
        if None in row:
            raise DirectoryError(f"{source}: line {line}: more fields than the header has")
        try:
            address = normalise_email(values.get("email"))
            if address in seen:
                raise DirectoryError(f"{address} is a duplicate of line {seen[address]}")
            seen[address] = line
            existing = find_account(session, address)
            if existing is not None:
                if _same_account(session, existing, values):
                    unchanged += 1
                    continue
                raise DirectoryError(f"an account with email {address} already exists")
            new_accounts.append(add_account(
                session,
                email=address,
                name=values.get("name", ""),
                company=values.get("company", ""),
                phone=values.get("phone") or None,
                locale=values.get("locale") or "fr",
                actor=actor,
            ))
            created += 1
        except DirectoryError as exc:
            raise DirectoryError(f"{source}: line {line}: {exc}") from None
    return ImportResult(created=created, unchanged=unchanged, accounts=tuple(new_accounts))


def _same_account(session: Session, account: Account, values: dict[str, str]) -> bool:
    company = session.get(Company, account.company_id)
    return (
        company is not None
        and company.name.lower() == values.get("company", "").lower()
        and account.name == values.get("name", "")
        and (account.phone or "") == values.get("phone", "")
        and account.locale == (values.get("locale") or "fr")
    )


# Agents


def find_agent(session: Session, email: str) -> Agent | None:
    """The agent with that email address."""
    return session.exec(select(Agent).where(Agent.email == email.strip().lower())).first()


def add_agent(session: Session, *, email: str, name: str, region: str, actor: str) -> Agent:
    """Create an agent in the EU or US team."""
    address = normalise_email(email)
    if region not in REGIONS:
        raise DirectoryError(f'region must be one of {", ".join(REGIONS)}, not "{region}"')
    if not clean_text(name, multiline=False):
        raise DirectoryError("name is missing")
    if find_agent(session, address):
        raise DirectoryError(f"an agent with email {address} already exists")
    agent = Agent(email=address, name=clean_text(name, multiline=False), region=region)
    session.add(agent)
    session.flush()
    _audit(session, "agent.add", actor, agent=address, region=region)
    return agent


def deactivate_agent(session: Session, *, email: str, actor: str) -> Agent:
    """Stop sending tickets to an agent."""
    agent = find_agent(session, email)
    if agent is None:
        raise DirectoryError(f"no agent with email {email.strip()}")
    agent.active = False
    session.add(agent)
    _audit(session, "agent.deactivate", actor, agent=agent.email)
    return agent


def agents_for(session: Session, company: Company) -> list[Agent]:
    """The active agents who may see this company's data.

    US staff see a company's data only when it subscribed to after-hours support: the privacy
    notice promises it, so the rule lives here, where every notification asks.
    """
    query = select(Agent).where(col(Agent.active).is_(True)).order_by(col(Agent.email))
    if not company.after_hours:
        query = query.where(Agent.region == "eu")
    return list(session.exec(query))


def list_agents(session: Session) -> list[Agent]:
    """All agents by email."""
    return list(session.exec(select(Agent).order_by(col(Agent.email))))
