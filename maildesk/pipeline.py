"""The pipeline: the decisions for one stored mail, and what follows from them.

Ingress makes each mail durable (store/intake.py); the intake runner (runner.py) claims stored
mails in batches, parses each with `Pipeline.parse`, and calls `Pipeline.file` for each in a
savepoint of its batch's transaction: the facts of the mail are looked up (filing.py), the
chain decides (rules/chain.py), and `Pipeline._actions` carries the decision out: the ticket and
its message are stored and the notifications enqueued in the outbox, so that they commit with
the mail that caused them. Agents' actions live in agent_actions.py, customers' in
customer_actions.py.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import Session

from maildesk import agent_actions, customer_actions
from maildesk.config import Settings
from maildesk.filing import Filing, finish, look_up
from maildesk.logs import get_logger
from maildesk.mail.limits import ParseLimits
from maildesk.mail.message import Delivery, Outcome, ParsedMail
from maildesk.mail.parse import MalformedMail, parse_mail, parse_mail_file
from maildesk.mail.spool import discard_spooled
from maildesk.mail.worker import ParseWorker
from maildesk.notices import Notices
from maildesk.outbound.notify import Notifier
from maildesk.privacy.rights import is_restricted
from maildesk.rules import classify
from maildesk.rules.authentication import authenticate_from
from maildesk.rules.chain import Action, decide
from maildesk.runner import IntakeRunner
from maildesk.signing import load_reply_keys
from maildesk.store import database, lookup
from maildesk.store.files import prepare_spool, read_raw
from maildesk.store.models import Account, AuditEvent, InboundMail, Ticket, utcnow
from maildesk.store.shared import desk_secret

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
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        # The time a mail is filed at: the tests move it to try the ticket clock and office hours.
        self.clock = clock
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
        self.parser: ParseWorker | None = None
        if parse_in_worker:
            # The child decodes large attachments into the spool, from which filing moves them;
            # it is replaced after 16 MiB of mail, so that the memory of a big one goes back.
            spool = prepare_spool(settings.desk.state_dir)
            self.parser = ParseWorker(
                cpu_seconds=limits.parse_seconds, recycle_after_bytes=16 * 2**20,
                limits=replace(self.parse_limits, spool_dir=str(spool)),
            )  # fmt: skip
        # Called after each commit that may have queued mail, to wake the sender.
        self.on_commit: Callable[[], object] = on_commit or (lambda: None)
        self.runner = IntakeRunner(self)

    def parse(self, raw: bytes) -> ParsedMail:
        """Parse one raw mail within the configured bounds (MalformedMail when it breaks one)."""
        if self.parser is not None:
            return self.parser.parse(raw)
        return parse_mail(raw, self.parse_limits)

    def parse_file(self, path: Path) -> ParsedMail:
        """Parse the raw mail kept at `path`: in the parse worker, the child reads it."""
        if self.parser is not None:
            return self.parser.parse_file(path)
        return parse_mail_file(path, self.parse_limits)

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
        """Decide for one stored mail by the chain and carry out its action."""
        oversize = delivery.oversize is not None
        parsed_here = parsed is None and not oversize
        if parsed_here:
            try:
                parsed = self.parse(raw)
            except MalformedMail as exc:
                parsed = exc
        try:
            f = Filing(session, inbound, self.settings, self.notifier, self.notices, delivery,
                       now=self.clock(), released=released, raw=raw)
            f.decision = decide(look_up(f, parsed, oversize=oversize, keys=self.reply_keys))
            return self._actions[f.decision.action](f)
        finally:
            if parsed_here:
                discard_spooled(parsed)  # What filing kept, it moved into the store.

    @property
    def _actions(self) -> dict[Action, Callable[[Filing], Outcome]]:
        """Each action of the chain and the function that carries it out: one place."""
        return {
            Action.QUARANTINE: self._quarantine,
            Action.KEEP_QUIET: lambda f: finish(f, "ignored", reason=f.reason),
            Action.RECORD_BOUNCE: self._record_bounce,
            Action.ANSWER_STRANGER: self._answer_stranger,
            Action.REFUSE_AGENT: self._refuse_agent,
            Action.REFUSE_FORWARD: self._refuse_agent,
            Action.OPEN_TICKET: customer_actions.open_new,
            Action.OPEN_FOLLOW_UP_TICKET: customer_actions.open_new,
            Action.ADD_FOLLOWUP: customer_actions.add_followup,
            Action.REOPEN_TICKET: customer_actions.add_followup,
            Action.ADD_ANSWER: agent_actions.add_answer,
            Action.ADD_NOTE: agent_actions.apply_commands,
            Action.APPLY_COMMANDS: lambda f: (
                agent_actions.apply_commands(f) if f.agent is not None
                else customer_actions.close_by_customer(f)
            ),
            Action.COMMAND_ERRORS: agent_actions.refuse,
            Action.FORWARD_OPEN: agent_actions.forward_open,
        }

    def _record_bounce(self, f: Filing) -> Outcome:
        """No bounce ever opens a ticket or gets an answer, matched or not."""
        assert f.bounce is not None
        sent, reason = self.notices.record_bounce(f.session, f.bounce, f.recipients)
        ticket = f.session.get(Ticket, sent.ticket_id) if sent and sent.ticket_id else None
        return finish(f, "bounce", ticket=ticket, reason=reason)

    def _answer_stranger(self, f: Filing) -> Outcome:
        """Tell a stranger how to get help, within the limits, and hold their mail."""
        assert f.sender is not None
        account = f.session.get(Account, f.sender.account_id) if f.sender.account_id else None
        self.notices.answer_stranger(f.session, f.sender.address, now=f.now,
                                     locale=account.locale if account else None)
        return finish(f, "quarantined", reason=f.reason)

    def _refuse_agent(self, f: Filing) -> Outcome:
        """Nothing is relayed or applied; the real agent hears of it at their own address."""
        assert f.agent is not None and f.decision is not None
        reason = f.decision.reason
        if (f.rule == "agent-us-restricted" and f.company is not None and f.company.after_hours
                and f.account is not None and is_restricted(f.account)):
            # Nothing of a person under restriction goes to the US.
            reason = "US agent on the ticket of a person whose data are restricted"
        self.notices.refuse_agent_mail(f.session, f.agent, reason=reason, ticket=f.ticket,
                                       now=f.now)
        if f.ticket is not None:
            f.session.add(AuditEvent(actor=f.agent.email, action="agent.refused",
                                     ticket_id=f.ticket.id,
                                     detail=json.dumps({"reason": reason})))
        return finish(f, "quarantined", reason=reason)

    def _quarantine(self, f: Filing) -> Outcome:
        """Hold the mail for a person, with the reason; a mail over the limit is told so."""
        if f.delivery.oversize is not None:
            return self._oversized(f, f.raw, f.delivery.oversize)
        return finish(f, "quarantined", reason=f.reason)

    def _oversized(self, f: Filing, head: bytes, size: int) -> Outcome:
        """A mail over the size limit: only its header was taken; its sender may hear why."""
        session, now = f.session, f.now
        reason = f"too large ({size} bytes, the limit is {self.settings.limits.max_mail_bytes})"
        try:
            mail = self.parse(head)
        except MalformedMail:
            return finish(f, "quarantined", reason=reason)
        f.inbound.message_id = (mail.message_id or "")[:998] or None
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
        return finish(f, "quarantined", reason=reason)
