"""The automatic mails that the pipeline may send, each behind the limits, and bounces.

Every automatic mail (an acknowledgement, an answer to a stranger, a refusal or size notice)
asks `Notices.may_send` first: the limits on automatic mail (rules/limits.py) decide over the
counts that the store keeps, so that no loop, no flood and no forged sender can make the desk
write more than a bounded number of mails to anyone. Bounces of mails we sent are matched here
to the mail they name and recorded on its ticket.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from maildesk.config import Settings
from maildesk.logs import get_logger
from maildesk.mail.bounce import Bounce, verp_token
from maildesk.outbound.notify import Notifier
from maildesk.rules.limits import automatic_refusal, mailbox_key
from maildesk.store import directory, lookup
from maildesk.store.models import Account, Agent, AuditEvent, Company, Outbox, Ticket

log = get_logger("notices")

# The kinds of mail whose bounce means that a customer did not hear from us.
_CUSTOMER_KINDS = {"acknowledgement", "answer", "too_large"}
# Success reports (RFC 3464 actions) record nothing.
_SUCCESS_ACTIONS = {"delivered", "relayed", "expanded"}


class Notices:
    """Automatic mails behind the limits, and the bounces of what we sent."""

    def __init__(self, settings: Settings, notifier: Notifier) -> None:
        self.settings = settings
        self.notifier = notifier

    def may_send(
        self, session: Session, address: str, *, now: datetime, account_id: int | None = None,
        to_stranger: bool = False,
    ) -> bool:
        """Whether one more automatic mail may go to `address` now; logs what holds it back."""
        limits = self.settings.limits
        counts = lookup.automatic_counts(
            session, key=mailbox_key(address), account_id=account_id, now=now,
            breaker_minutes=limits.breaker_minutes, to_stranger=to_stranger,
        )
        refusal = automatic_refusal(counts, limits, to_stranger=to_stranger)
        if refusal is None:
            return True
        if refusal.startswith("breaker"):
            # An alert: a sender opening tickets this fast is a loop or an attack.
            log.warning("breaker tripped: automatic mail stopped", account=account_id,
                        tickets=counts.tickets_by_sender, reason=refusal)
        else:
            log.info("automatic mail held back", account=account_id, reason=refusal)
        return False

    def answer_stranger(
        self, session: Session, address: str, *, now: datetime, locale: str | None
    ) -> None:
        """Tell a stranger how to get an account: once a day per mailbox, within the limits."""
        if "@" not in address:
            return
        already = session.exec(
            select(Outbox.id).where(
                Outbox.kind == "unknown_sender",
                Outbox.mailbox_key == mailbox_key(address),
                Outbox.created_at > now - timedelta(days=1),
            ).limit(1)
        ).first()
        if already is not None or not self.may_send(session, address, now=now, to_stranger=True):
            return
        try:
            self.notifier.answer_unknown_sender(session, address=address, locale=locale)
        except ValueError:
            # An address we cannot write a header for gets no answer; the mail is still kept.
            log.info("no answer to an unusable address")

    def refuse_agent_mail(
        self, session: Session, agent: Agent, *, reason: str, ticket: Ticket | None,
        now: datetime,
    ) -> None:
        """Tell an agent that a mail in their name was not acted on, within the limits."""
        if self.may_send(session, agent.email, now=now):
            self.notifier.tell_agent_refused(session, agent=agent, reason=reason, ticket=ticket)

    def too_large(
        self, session: Session, account: Account, *, size: int, now: datetime
    ) -> None:
        """Tell a customer that their mail was over the size limit, within the limits."""
        if self.may_send(session, account.email, now=now, account_id=account.id):
            self.notifier.tell_too_large(
                session, account=account, size=size, limit=self.settings.limits.max_mail_bytes
            )

    def record_bounce(
        self, session: Session, bounce: Bounce, recipients: list[str]
    ) -> tuple[Outbox | None, str]:
        """Match a bounce to the mail we sent and record it; returns that mail and a reason."""
        sent = self._bounced_mail(session, bounce, recipients)
        if sent is None:
            return None, "bounce: matches no mail we sent"
        worst = ""
        for status in bounce.recipients:
            if status.action in _SUCCESS_ACTIONS:
                continue
            # Postfix gives up after the queue lifetime with "failed" and a 4.x.x status: the
            # mail is lost all the same.
            permanent = status.permanent or status.action == "failed"
            detail = json.dumps({
                "outbox": sent.id, "kind": sent.kind, "recipient": status.address,
                "status": status.status, "action": status.action,
                "diagnostic": status.diagnostic[:300],
            }, ensure_ascii=False)
            action = "mail.undeliverable" if permanent else "mail.delayed"
            session.add(AuditEvent(actor="mailer-daemon", action=action,
                                   ticket_id=sent.ticket_id, detail=detail))
            worst = status.status if permanent or not worst else worst
            if permanent and sent.ticket_id is not None and sent.kind in _CUSTOMER_KINDS:
                self._tell_agents(session, sent.ticket_id, status.address, status.status,
                                  status.diagnostic)
        session.flush()
        return sent, f"bounce: {worst or 'no status'} for outgoing mail {sent.id}"

    def mail_given_up(self, session: Session, outbox_id: int, reason: str) -> None:
        """Record on its ticket that a mail will not be delivered, and tell the agents once."""
        sent = session.get(Outbox, outbox_id)
        if sent is None or sent.ticket_id is None:
            return
        try:
            recipients = [str(r) for r in json.loads(sent.recipients)]
        except (ValueError, TypeError):
            recipients = []
        session.add(AuditEvent(
            actor="maildesk", action="mail.failed", ticket_id=sent.ticket_id,
            detail=json.dumps({"outbox": sent.id, "kind": sent.kind, "recipients": recipients,
                               "reason": reason[:300]}, ensure_ascii=False),
        ))  # fmt: skip
        # Only a mail meant for the customer is news for the agents; telling them that one of
        # their own notifications failed would only fail again the same way.
        if sent.kind in _CUSTOMER_KINDS:
            code = reason.split(" ", 1)[0] if reason[:1].isdigit() else "gave up"
            self._tell_agents(session, sent.ticket_id, ", ".join(recipients), code, reason)
        session.flush()

    def _bounced_mail(
        self, session: Session, bounce: Bounce, recipients: list[str]
    ) -> Outbox | None:
        desk = self.settings.desk.address
        for address in recipients:
            token = verp_token(address, desk)
            if token is not None:
                found = session.exec(select(Outbox).where(Outbox.verp == token)).first()
                if found is not None:
                    return found
        ids = list(bounce.original_message_ids)
        if not ids:
            return None
        sent_by_id = {
            row.message_id: row
            for row in session.exec(select(Outbox).where(col(Outbox.message_id).in_(ids)))
        }
        # The bounce lists the failed mail's ids best first; the first that we sent wins.
        return next((sent_by_id[mid] for mid in ids if mid in sent_by_id), None)

    def _tell_agents(
        self, session: Session, ticket_id: int, recipient: str, status: str, diagnostic: str
    ) -> None:
        ticket = session.get(Ticket, ticket_id)
        company = session.get(Company, ticket.company_id) if ticket else None
        if ticket is None or company is None:
            return
        self.notifier.tell_agents_undeliverable(
            session, ticket=ticket, agents=directory.agents_for(session, company),
            recipient=recipient, status=status, diagnostic=" ".join(diagnostic.split())[:300],
        )
