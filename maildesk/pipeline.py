"""The pipeline: the decisions for one stored mail, and what follows from them.

Ingress makes each mail durable (store/intake.py); the intake runner (runner.py) claims stored
mails in batches, parses each with `Pipeline.parse`, and calls `Pipeline.file` for each in a
savepoint of its batch's transaction: classify, route, store the ticket and its message, and
enqueue the notifications in the outbox, so that they commit with the mail that caused them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session

from maildesk.config import Settings
from maildesk.logs import get_logger
from maildesk.mail.bounce import read_bounce
from maildesk.mail.limits import ParseLimits
from maildesk.mail.message import Delivery, Outcome, ParsedMail
from maildesk.mail.parse import MalformedMail, parse_mail
from maildesk.mail.quotes import scrub_reply_addresses, strip_quoted_reply
from maildesk.mail.worker import ParseWorker
from maildesk.notices import Notices
from maildesk.outbound.notify import Notifier
from maildesk.privacy.requests import check_mail as check_rights_request
from maildesk.privacy.rights import is_restricted
from maildesk.rules import classify, route
from maildesk.rules.authentication import AuthVerdict, authenticate_from
from maildesk.runner import IntakeRunner
from maildesk.signing import ReplyToken, load_reply_keys
from maildesk.store import database, directory, lookup
from maildesk.store.files import read_raw
from maildesk.store.models import (
    Account,
    Agent,
    AuditEvent,
    Company,
    InboundMail,
    Ticket,
    utcnow,
)
from maildesk.store.shared import desk_secret
from maildesk.store.tickets import add_message, open_ticket

log = get_logger("pipeline")


class Pipeline:
    """Parse, classify, route, store and notify: one mail, one transaction."""

    def __init__(
        self,
        settings: Settings,
        engine: sa.Engine,
        *,
        on_commit: Callable[[], object] | None = None,
        parse_in_worker: bool = False,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.reply_keys = load_reply_keys(
            settings, lambda make: desk_secret(engine, "reply_key", make)
        )
        self.notifier = Notifier(settings, self.reply_keys)
        self.notices = Notices(settings, self.notifier)
        limits = settings.limits
        self.parse_limits = ParseLimits(
            max_mail_bytes=limits.max_mail_bytes, max_parts=limits.max_parts,
            max_depth=limits.max_depth, max_header_bytes=limits.max_header_bytes,
        )
        # The daemon parses in a child process with a CPU budget, so that no mail can hold it
        # for long, memory goes back after a big mail and SIGTERM is never kept waiting; the
        # CLI and the tests parse in process.
        self.parser = (
            # A child is replaced after 16 MiB of mail, so the memory of a big one goes back.
            ParseWorker(cpu_seconds=limits.parse_seconds, limits=self.parse_limits,
                        recycle_after_bytes=16 * 2**20)
            if parse_in_worker else None
        )
        # Called after each commit that may have queued mail, to wake the sender.
        self.on_commit: Callable[[], object] = on_commit or (lambda: None)
        self.runner = IntakeRunner(self)

    def parse(self, raw: bytes) -> ParsedMail:
        """Parse one raw mail within the configured bounds (MalformedMail when it breaks one)."""
        if self.parser is not None:
            return self.parser.parse(raw)
        return parse_mail(raw, self.parse_limits)

    def warm(self) -> None:
        """Start the parse worker's child and compile the templates now, so that the first
        mail after a start is filed as fast as any other.
        """
        self.notifier.warm()
        if self.parser is not None:
            # A child is ready once it has parsed something: its imports are done by then.
            with contextlib.suppress(MalformedMail):
                self.parser.parse(b"From: warm@maildesk.invalid\r\n\r\n.\r\n")

    def stop_parsing(self) -> None:
        """Stop the parse worker at once (a parse under way raises WorkerStopped)."""
        if self.parser is not None:
            self.parser.stop()

    def close(self) -> None:
        """Release the parse worker's child processes."""
        if self.parser is not None:
            self.parser.close()

    def process(self, raw: bytes, delivery: Delivery) -> Outcome:
        """Store and file one mail at once (the CLI and the tests; the daemon queues instead)."""
        return self.runner.process(raw, delivery)

    def release(self, inbound_id: int, *, actor: str) -> Outcome:
        """File a quarantined mail again, for example after its sender got an account."""
        with database.session_scope(self.engine) as session:
            inbound = session.get(InboundMail, inbound_id)
            if inbound is None or inbound.outcome != "quarantined":
                raise ValueError(f"no quarantined mail with id {inbound_id}")
            raw = read_raw(self.settings.desk.state_dir, inbound.raw_path)
            delivery = Delivery(source=inbound.source, envelope_from=inbound.envelope_from)
            outcome = self.file(session, inbound, raw, delivery, None, released=True)
            session.add(AuditEvent(
                actor=actor, action="quarantine.release", ticket_id=outcome.ticket_id,
                detail=json.dumps({"inbound": inbound_id, "outcome": outcome.outcome}),
            ))
        self.on_commit()
        return outcome

    def file(
        self,
        session: Session,
        inbound: InboundMail,
        raw: bytes,
        delivery: Delivery,
        parsed: ParsedMail | MalformedMail | None,
        *,
        released: bool = False,
    ) -> Outcome:
        """Decide for one stored mail and write what follows (ticket, message, outbox rows)."""
        now = utcnow()
        desk = self.settings.desk
        if delivery.oversize is not None:
            return self._oversized(session, inbound, raw, delivery.oversize, now)
        if parsed is None:
            try:
                parsed = self.parse(raw)
            except MalformedMail as exc:
                parsed = exc
        if isinstance(parsed, MalformedMail):
            return _finish(session, inbound, "quarantined", reason=f"malformed: {parsed.reason}")
        mail = parsed
        inbound.message_id = (mail.message_id or "")[:998] or None
        if mail.from_address.lower() == desk.address:
            return _finish(session, inbound, "ignored", reason="sent by the desk itself")
        recipients = route.recipients_of(mail, delivery.recipients)
        bounce = read_bounce(mail)
        if bounce is not None:
            # No bounce ever opens a ticket or gets an answer, matched or not.
            sent, reason = self.notices.record_bounce(session, bounce, recipients)
            ticket = session.get(Ticket, sent.ticket_id) if sent and sent.ticket_id else None
            return _finish(session, inbound, "bounce", ticket=ticket, reason=reason)
        if mail.from_problem is not None:
            # A From that names two people, or hides one address behind another, is the first
            # step of a spoofing trick: nobody is answered and a person looks at it.
            return _finish(session, inbound, "quarantined",
                           reason=f"ambiguous sender: {mail.from_problem}")
        automatic = classify.automatic_reason(mail, delivery)
        sender = classify.identify_sender(
            mail.from_address, lookup.directory_entry(session, mail.from_address, now)
        )
        tokens = route.reply_tokens(recipients, desk.address)
        facts = lookup.thread_facts(
            session, [*(t.ticket_id for t in tokens), *route.subject_tags(mail)],
            route.thread_message_ids(mail),
        )
        verdict = authenticate_from(mail, self.settings.security.trusted_authserv_id)

        if sender.kind == "agent":
            return self._agent_mail(session, inbound, mail, sender, tokens, facts,
                                    automatic, verdict, now)
        if sender.kind != "account":
            reason = "unknown sender" if sender.kind == "unknown" else "account deactivated"
            # Where the MTA's verdicts are trusted, only an authenticated stranger is answered:
            # anyone else may be a forged sender, and the answer would be backscatter.
            if automatic is None and (verdict is None or verdict.authenticated):
                account = session.get(Account, sender.account_id) if sender.account_id else None
                self.notices.answer_stranger(
                    session, sender.address, now=now, locale=account.locale if account else None
                )
            return _finish(session, inbound, "quarantined", reason=reason)
        if automatic is not None:
            if automatic in classify.QUIET_RULES:
                # Out-of-office replies and the like are kept, but file nothing and answer
                # nothing: filing them would notify the agents of every vacation message.
                return _finish(session, inbound, "ignored", reason=f"automatic: {automatic}")
            # A machine's mail (a list, a no-reply sender, a report) never opens a ticket that
            # the customer would see: it waits in quarantine for the agents.
            return _finish(session, inbound, "quarantined",
                           reason=f"automatic sender: {automatic}")
        if verdict is not None and not verdict.authenticated:
            return _finish(session, inbound, "quarantined", reason=verdict.reason)
        found = route.find_route(
            mail, sender, tokens, facts, keys=self.reply_keys, today=now.date()
        )
        account = session.get(Account, sender.account_id)
        company = session.get(Company, sender.company_id)
        assert account is not None and company is not None
        agents = directory.agents_for(session, company)
        _persist(session, inbound)
        if found is not None:
            ticket = session.get(Ticket, found.ticket_id)
            assert ticket is not None
            message = add_message(
                session, state_dir=desk.state_dir, ticket=ticket, mail=mail,
                text=strip_quoted_reply(mail.text), inbound_mail_id=inbound.id,
                matched_by=found.matched_by, account=account,
            )
            check_rights_request(session, ticket=ticket, account=account, message=message,
                                 subject=mail.subject, received_at=inbound.received_at,
                                 notifier=self.notifier)  # fmt: skip
            # Under restriction, a person's data are kept but not processed: nobody is told.
            if not is_restricted(account):
                self.notifier.tell_agents_followup(
                    session, ticket=ticket, account=account, company=company,
                    message=message, agents=agents,
                )
            return _finish(session, inbound, "followup", ticket=ticket,
                           reason=found.matched_by)
        ticket = open_ticket(session, account=account, mail=mail)
        message = add_message(
            session, state_dir=desk.state_dir, ticket=ticket, mail=mail,
            text=mail.text, inbound_mail_id=inbound.id, matched_by=None, account=account,
        )
        acknowledged = not classify.suppresses_auto_reply(mail) and self.notices.may_send(
            session, account.email, now=now, account_id=account.id
        )
        if acknowledged:
            self.notifier.acknowledge(session, ticket=ticket, account=account, message=message)
        check_rights_request(session, ticket=ticket, account=account, message=message,
                             subject=mail.subject, received_at=inbound.received_at,
                             notifier=self.notifier)  # fmt: skip
        if not is_restricted(account):
            self.notifier.tell_agents_new_ticket(
                session, ticket=ticket, account=account, company=company, message=message,
                agents=agents,
            )
        note = "released" if released else None if acknowledged else "not acknowledged"
        return _finish(session, inbound, "ticket", ticket=ticket, reason=note)

    def _agent_mail(
        self,
        session: Session,
        inbound: InboundMail,
        mail: ParsedMail,
        sender: classify.Sender,
        tokens: list[ReplyToken],
        facts: route.ThreadFacts,
        automatic: str | None,
        verdict: AuthVerdict | None,
        now: datetime,
    ) -> Outcome:
        """An agent acts only through a reply address signed for them, and authenticated."""
        if automatic is not None:
            return _finish(session, inbound, "ignored", reason=f"automatic: {automatic}")
        agent = session.get(Agent, sender.agent_id)
        assert agent is not None
        ticket_id = route.signed_ticket(
            sender, tokens, facts, keys=self.reply_keys, today=now.date()
        )
        ticket = session.get(Ticket, ticket_id) if ticket_id is not None else None
        refusal: str | None = None
        if verdict is not None and not verdict.authenticated:
            refusal = f"agent mail not authenticated: {verdict.reason}"
        elif ticket is None:
            refusal = "agent mail without a signed reply address"
        else:
            company = session.get(Company, ticket.company_id)
            if agent.region.upper() == "US" and not (company and company.after_hours):
                refusal = "US agent on a company without after-hours support"
        if refusal is not None:
            # Nothing is relayed or applied; the real agent hears of it at their own address.
            self.notices.refuse_agent_mail(session, agent, reason=refusal, ticket=ticket,
                                           now=now)
            if ticket is not None:
                session.add(AuditEvent(actor=agent.email, action="agent.refused",
                                       ticket_id=ticket.id, detail=json.dumps({"reason": refusal})))
            return _finish(session, inbound, "quarantined", reason=refusal)
        assert ticket is not None
        account = session.get(Account, ticket.account_id)
        assert account is not None
        if agent.region.upper() == "US" and is_restricted(account):
            # Nothing of a person under restriction goes to the US.
            refusal = "US agent on the ticket of a person whose data are restricted"
            self.notices.refuse_agent_mail(session, agent, reason=refusal, ticket=ticket, now=now)
            session.add(AuditEvent(actor=agent.email, action="agent.refused",
                                   ticket_id=ticket.id, detail=json.dumps({"reason": refusal})))
            return _finish(session, inbound, "quarantined", reason=refusal)
        _persist(session, inbound)
        # The quoted history goes, and any reply address of ours left in what remains: no
        # address issued to an agent may reach the customer.
        text = scrub_reply_addresses(strip_quoted_reply(mail.text), self.settings.desk.address)
        message = add_message(
            session, state_dir=self.settings.desk.state_dir, ticket=ticket, mail=mail,
            text=text, inbound_mail_id=inbound.id, matched_by=route.BY_REPLY_ADDRESS,
            agent=agent,
        )
        self.notifier.relay_answer(
            session, ticket=ticket, account=account, agent=agent, message=message
        )
        return _finish(session, inbound, "answer", ticket=ticket)

    def _oversized(
        self, session: Session, inbound: InboundMail, head: bytes, size: int, now: datetime
    ) -> Outcome:
        """A mail over the size limit: only its header was taken; its sender may hear why."""
        reason = f"too large ({size} bytes, the limit is {self.settings.limits.max_mail_bytes})"
        try:
            mail = self.parse(head)
        except MalformedMail:
            return _finish(session, inbound, "quarantined", reason=reason)
        inbound.message_id = (mail.message_id or "")[:998] or None
        entry = lookup.directory_entry(session, mail.from_address, now)
        sender = classify.identify_sender(mail.from_address, entry)
        automatic = classify.automatic_reason(mail, Delivery(source="imap"))
        verdict = authenticate_from(mail, self.settings.security.trusted_authserv_id)
        if sender.kind == "account" and automatic is None and mail.from_problem is None and (
            verdict is None or verdict.authenticated
        ):
            account = session.get(Account, sender.account_id)
            if account is not None:
                self.notices.too_large(session, account, size=size, now=now)
        return _finish(session, inbound, "quarantined", reason=reason)


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
