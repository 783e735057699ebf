"""The pipeline: one raw mail in, one committed transaction out.

Both ingress stages (fetch for IMAP, listen for SMTP/LMTP) hand the raw bytes to
`Pipeline.process`, which parses, classifies, routes, stores and enqueues notifications in one
database transaction, and returns only after that transaction has committed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col, select

from maildesk.config import Settings
from maildesk.logs import get_logger
from maildesk.mail.message import Delivery, Outcome, ParsedMail, StoreUnavailable
from maildesk.mail.parse import MalformedMail, parse_mail
from maildesk.mail.quotes import strip_quoted_reply
from maildesk.outbound.notify import Notifier
from maildesk.rules import classify, route
from maildesk.signing import load_reply_key
from maildesk.store import database, directory, lookup
from maildesk.store.files import read_raw, save_raw
from maildesk.store.models import (
    Account,
    Agent,
    AuditEvent,
    Company,
    InboundMail,
    Outbox,
    Ticket,
    utcnow,
)
from maildesk.store.tickets import add_message, open_ticket

log = get_logger("pipeline")

# Failures after which the sender should simply try again: the database is down or busy, or
# the disk is full. Anything else is a bug or a bad mail, and goes to quarantine.
_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError)


def _is_temporary(exc: Exception) -> bool:
    """Whether the sender should try again later rather than have the mail quarantined."""
    # A system error carries an errno (disk full, permission denied); other OSError
    # subclasses, such as jinja2's TemplateNotFound, are bugs in the installation.
    return isinstance(exc, _UNAVAILABLE) or (isinstance(exc, OSError) and exc.errno is not None)


class Pipeline:
    """Parse, classify, route, store and notify: one mail, one transaction."""

    def __init__(
        self,
        settings: Settings,
        engine: sa.Engine,
        *,
        on_commit: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.reply_key = load_reply_key(settings)
        self.notifier = Notifier(settings, self.reply_key)
        # Called after each commit that may have queued mail, to wake the sender.
        self.on_commit: Callable[[], object] = on_commit or (lambda: None)

    def stored_uids(self, mailbox: str, uidvalidity: int, uids: list[int]) -> set[int]:
        """Which of these IMAP UIDs were stored already: the fetcher's checkpoint."""
        found: set[int] = set()
        try:
            with Session(self.engine) as session:
                # Chunks keep the IN list within every database's limits on parameters.
                for start in range(0, len(uids), 500):
                    chunk = uids[start : start + 500]
                    query = select(InboundMail.uid).where(
                        InboundMail.mailbox == mailbox,
                        InboundMail.uidvalidity == uidvalidity,
                        col(InboundMail.uid).in_(chunk),
                    )
                    found.update(uid for uid in session.exec(query) if uid is not None)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(str(exc)) from exc
        return found

    def process(self, raw: bytes, delivery: Delivery) -> Outcome:
        """File one raw mail; returns only after its transaction has committed."""
        started = time.monotonic()
        try:
            try:
                outcome = self._process(raw, delivery)
            except sa.exc.IntegrityError:
                # Another delivery of the same bytes committed first; this one is its
                # duplicate, which the second pass finds and reports.
                outcome = self._process(raw, delivery)
        except Exception as exc:
            if _is_temporary(exc):
                log.warning("store unavailable", source=delivery.source, error=str(exc))
                raise StoreUnavailable(str(exc)) from exc
            # The error boundary: a bug on one mail must not stop the desk. The mail is kept
            # in quarantine with the reason, for a person to look at, and the next one goes on.
            log.exception("mail failed", source=delivery.source, uid=delivery.uid)
            outcome = self._quarantine_after_error(raw, delivery, exc)
        self.on_commit()
        log.info(
            "mail processed",
            source=delivery.source,
            inbound=outcome.inbound_id,
            outcome=outcome.outcome,
            ticket=outcome.ticket_id,
            reason=outcome.reason,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return outcome

    def release(self, inbound_id: int, *, actor: str) -> Outcome:
        """File a quarantined mail again, for example after its sender got an account."""
        with database.session_scope(self.engine) as session:
            inbound = session.get(InboundMail, inbound_id)
            if inbound is None or inbound.outcome != "quarantined":
                raise ValueError(f"no quarantined mail with id {inbound_id}")
            raw = read_raw(self.settings.desk.state_dir, inbound.raw_path)
            delivery = Delivery(source=inbound.source, envelope_from=inbound.envelope_from)
            inbound.attempts += 1
            outcome = self._file(session, inbound, raw, delivery, released=True)
            session.add(AuditEvent(
                actor=actor, action="quarantine.release", ticket_id=outcome.ticket_id,
                detail=json.dumps({"inbound": inbound_id, "outcome": outcome.outcome}),
            ))
        self.on_commit()
        return outcome

    def _process(self, raw: bytes, delivery: Delivery) -> Outcome:
        digest, raw_path = save_raw(self.settings.desk.state_dir, raw)
        with database.session_scope(self.engine) as session:
            # The same bytes twice are one mail: an MTA that lost our 250, or a crash between
            # the commit and the IMAP move. Filing it again would double the ticket.
            earlier = session.exec(
                select(InboundMail).where(InboundMail.sha256 == digest).limit(1)
            ).first()
            if earlier is not None:
                return Outcome(earlier.id, "duplicate", earlier.ticket_id, earlier.outcome)  # type: ignore[arg-type]
            inbound = InboundMail(
                source=delivery.source,
                raw_path=raw_path,
                sha256=digest,
                size=len(raw),
                mailbox=delivery.mailbox,
                uidvalidity=delivery.uidvalidity,
                uid=delivery.uid,
                envelope_from=(delivery.envelope_from or "")[:320] or None,
                attempts=1,
            )
            # The row is added only when the first write is due (see _persist): SQLite takes
            # its write lock at the first INSERT, and parsing and routing need none.
            return self._file(session, inbound, raw, delivery, released=False)

    def _file(
        self,
        session: Session,
        inbound: InboundMail,
        raw: bytes,
        delivery: Delivery,
        *,
        released: bool,
    ) -> Outcome:
        now = utcnow()
        try:
            mail = parse_mail(raw)
        except MalformedMail as exc:
            return _finish(session, inbound, "quarantined", reason=f"malformed: {exc.reason}")
        inbound.message_id = (mail.message_id or "")[:998] or None
        if mail.from_address.lower() == self.settings.desk.address:
            return _finish(session, inbound, "ignored", reason="sent by the desk itself")
        automatic = classify.automatic_reason(mail, delivery)
        sender = classify.identify_sender(
            mail.from_address, lookup.directory_entry(session, mail.from_address, now)
        )
        recipients = route.recipients_of(mail, delivery.recipients)

        if sender.kind == "agent":
            return self._agent_mail(session, inbound, mail, sender, recipients, automatic)
        if sender.kind != "account":
            reason = "unknown sender" if sender.kind == "unknown" else "account deactivated"
            if automatic is None:
                self._answer_stranger(session, sender, now)
            return _finish(session, inbound, "quarantined", reason=reason)
        if automatic is not None:
            # Out-of-office replies and the like are kept, but file nothing and answer nothing:
            # filing them would notify the agents of every vacation message.
            return _finish(session, inbound, "ignored", reason=f"automatic: {automatic}")
        failure = classify.authentication_failure(mail, self.settings.security.trusted_authserv_id)
        if failure is not None:
            return _finish(session, inbound, "quarantined", reason=failure)
        key, desk_address = self.reply_key, self.settings.desk.address
        named = route.subject_tags(mail)
        signed = route.signed_ticket(
            mail, sender.address, recipients, key=key, desk_address=desk_address
        )
        if signed is not None:
            named.append(signed)
        facts = lookup.thread_facts(session, named, route.thread_message_ids(mail))
        found = route.find_route(
            mail, sender, recipients, facts, key=key, desk_address=desk_address
        )
        account = session.get(Account, sender.account_id)
        company = session.get(Company, sender.company_id)
        assert account is not None and company is not None
        text = strip_quoted_reply(mail.text)
        agents = directory.agents_for(session, company)
        _persist(session, inbound)
        if found is not None:
            ticket = session.get(Ticket, found.ticket_id)
            assert ticket is not None
            message = add_message(
                session, state_dir=self.settings.desk.state_dir, ticket=ticket, mail=mail,
                text=text, inbound_mail_id=inbound.id, matched_by=found.matched_by,
                account=account,
            )
            self.notifier.tell_agents_followup(
                session, ticket=ticket, account=account, company=company,
                message=message, agents=agents,
            )
            return _finish(session, inbound, "followup", ticket=ticket,
                           reason=found.matched_by)
        ticket = open_ticket(session, account=account, mail=mail)
        message = add_message(
            session, state_dir=self.settings.desk.state_dir, ticket=ticket, mail=mail,
            text=mail.text, inbound_mail_id=inbound.id, matched_by=None, account=account,
        )
        self.notifier.acknowledge(session, ticket=ticket, account=account, message=message)
        self.notifier.tell_agents_new_ticket(
            session, ticket=ticket, account=account, company=company, message=message,
            agents=agents,
        )
        return _finish(session, inbound, "ticket", ticket=ticket,
                       reason="released" if released else None)

    def _agent_mail(
        self,
        session: Session,
        inbound: InboundMail,
        mail: ParsedMail,
        sender: classify.Sender,
        recipients: list[str],
        automatic: str | None,
    ) -> Outcome:
        """An agent's answer counts only when sent to a reply address signed for them."""
        if automatic is not None:
            return _finish(session, inbound, "ignored", reason=f"automatic: {automatic}")
        ticket_id = route.signed_ticket(
            mail, sender.address, recipients,
            key=self.reply_key, desk_address=self.settings.desk.address,
        )
        ticket = session.get(Ticket, ticket_id) if ticket_id is not None else None
        if ticket is None:
            return _finish(session, inbound, "quarantined",
                           reason="agent mail without a signed reply address")
        account = session.get(Account, ticket.account_id)
        agent = session.get(Agent, sender.agent_id)
        assert account is not None and agent is not None
        _persist(session, inbound)
        message = add_message(
            session, state_dir=self.settings.desk.state_dir, ticket=ticket, mail=mail,
            text=strip_quoted_reply(mail.text), inbound_mail_id=inbound.id,
            matched_by=route.BY_REPLY_ADDRESS, agent=agent,
        )
        self.notifier.relay_answer(
            session, ticket=ticket, account=account, agent=agent, message=message
        )
        return _finish(session, inbound, "answer", ticket=ticket)

    def _answer_stranger(self, session: Session, sender: classify.Sender, now: datetime) -> None:
        """Tell a stranger how to get an account, at most once a day per address."""
        if not sender.address or "@" not in sender.address:
            return
        recipients = json.dumps([sender.address])
        since = now - timedelta(days=1)
        already = session.exec(
            select(Outbox.id).where(
                Outbox.kind == "unknown_sender",
                Outbox.recipients == recipients,
                Outbox.created_at > since,
            ).limit(1)
        ).first()
        if already is None:
            account = session.get(Account, sender.account_id) if sender.account_id else None
            locale = account.locale if account else None
            try:
                self.notifier.answer_unknown_sender(
                    session, address=sender.address, locale=locale
                )
            except ValueError:
                # An address we cannot write a header for gets no answer; the mail is still
                # kept in quarantine.
                log.info("no answer to an unusable address")

    def _quarantine_after_error(self, raw: bytes, delivery: Delivery, exc: Exception) -> Outcome:
        digest, raw_path = save_raw(self.settings.desk.state_dir, raw)
        reason = f"internal error: {type(exc).__name__}"
        try:
            with database.session_scope(self.engine) as session:
                inbound = InboundMail(
                    source=delivery.source, raw_path=raw_path, sha256=digest, size=len(raw),
                    mailbox=delivery.mailbox, uidvalidity=delivery.uidvalidity, uid=delivery.uid,
                    envelope_from=(delivery.envelope_from or "")[:320] or None, attempts=1,
                )
                session.add(inbound)
                session.flush()
                return _finish(session, inbound, "quarantined", reason=reason)
        except _UNAVAILABLE as unavailable:
            raise StoreUnavailable(str(unavailable)) from unavailable


def _persist(session: Session, inbound: InboundMail) -> None:
    """Write the mail's ledger row, so that what follows can refer to its id."""
    session.add(inbound)
    session.flush()


def _finish(
    session: Session,
    inbound: InboundMail,
    outcome: str,
    *,
    ticket: Ticket | None = None,
    reason: str | None = None,
) -> Outcome:
    inbound.outcome = outcome
    inbound.reason = reason
    inbound.ticket_id = ticket.id if ticket else None
    inbound.processed_at = utcnow()
    session.add(inbound)
    session.flush()
    return Outcome(inbound.id, outcome, inbound.ticket_id, reason)  # type: ignore[arg-type]
