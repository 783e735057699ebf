"""Notify stage: render maildesk's mails from jinja2 templates and enqueue them in the Outbox.

Each mail is written to the Outbox inside the caller's transaction, so that it leaves if and
only if the change that caused it is committed. Templates live in `templates/<locale>/`; see
`templates/README.md` for their layout.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.headerregistry import Address
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import jinja2
import sqlalchemy as sa
from sqlmodel import Session, col, select

from maildesk.config import Settings
from maildesk.mail.htmltext import clean_text
from maildesk.mail.quotes import REPLY_ABOVE_MARKER, scrub_reply_addresses
from maildesk.outbound.compose import Draft, DraftFile
from maildesk.outbound.handoff import claim_for_sender
from maildesk.rules.commands import valid_commands_help
from maildesk.rules.limits import mailbox_key
from maildesk.signing import (
    ReplyKeyring,
    principal_of_account,
    principal_of_agent,
    reply_address,
)
from maildesk.store.access_log import record_delivery
from maildesk.store.models import (
    Account,
    Agent,
    Attachment,
    Company,
    Message,
    Outbox,
    Ticket,
    utcnow,
)

LOCALES = ("fr", "en")
# Set while a mail is filed that must notify nobody (an archive import); see silenced().
SILENCED: contextvars.ContextVar[bool] = contextvars.ContextVar("silenced", default=False)
# The mails that go to agents only; every other kind may reach a customer.
_AGENT_KINDS = ("new_ticket", "followup", "agent_refused", "undeliverable")
# Enough history for any client to thread the mail; the first id and the newest ones matter most.
MAX_REFERENCES = 10

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
# A msg-id as we are willing to repeat it: printable ASCII, no spaces or angle brackets inside,
# so that no stored value, however it was received, can inject anything into a header.
_MSG_ID = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]{1,900}>")


def default_templates_dir() -> Path:
    """The source tree's top-level templates/ when present, else the copy inside the package."""
    source = _PACKAGE_DIR.parent / "templates"
    # pyproject.toml beside it tells a source checkout from site-packages, where some unrelated
    # distribution might have installed a top-level "templates" folder.
    if source.is_dir() and (_PACKAGE_DIR.parent / "pyproject.toml").is_file():
        return source
    return _PACKAGE_DIR / "templates"


def _clean_value(value: Any) -> Any:
    return clean_text(value, multiline=True) if isinstance(value, str) else value


def _one_line(value: str) -> str:
    # Names and subjects come partly from customers' mails; collapsing whitespace keeps a stray
    # CR or LF, or a control character, from reaching a header.
    return clean_text(value, multiline=False)


@dataclass(frozen=True)
class _Rendered:
    subject: str
    text: str
    html: str


class Notifier:
    """Renders maildesk's mails and enqueues them in the caller's session."""

    def __init__(
        self, settings: Settings, reply_keys: ReplyKeyring, templates_dir: Path | None = None
    ) -> None:
        self.settings = settings
        self.reply_keys = reply_keys
        self.templates_dir = templates_dir or default_templates_dir()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(self.templates_dir),
            # Only *.html.j2 escapes: the text part must show a customer's "<" as it is, the
            # HTML part must never let a customer's markup through.
            autoescape=jinja2.select_autoescape(
                enabled_extensions=("html.j2",), default_for_string=False, default=False
            ),
            undefined=jinja2.StrictUndefined,
            # Every value printed into a mail loses its control and bidi characters, whatever
            # row it came from: a name with ESC or CR in the store reaches no recipient.
            finalize=_clean_value,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )

    def acknowledge(
        self, session: Session, *, ticket: Ticket, account: Account, message: Message
    ) -> Outbox:
        """Tell a customer that their ticket was opened, quoting nothing of their mail."""
        locale = self._locale(account.locale)
        rendered = self._render(
            "acknowledgement", locale, ticket=ticket, account=account,
            us_transfer=self._us_transfer(session, ticket), full_notice=self._notice_due(account),
        )
        return self._enqueue(
            session, "acknowledgement", rendered, locale, _to(account.name, account.email),
            ticket=ticket, parent=message, auto="auto-replied",
            principal=principal_of_account(account.id),  # type: ignore[arg-type]
            automatic=True,
        )

    def tell_customer_closed(
        self, session: Session, *, ticket: Ticket, account: Account, reason: str
    ) -> Outbox:
        """Tell a customer that their ticket closed itself; `reason` "no_answer" or "solved".

        The mail carries their reply address: a reply within `[tickets] reopen_days` reopens it.
        """
        locale = self._locale(account.locale)
        tickets = self.settings.tickets
        days = tickets.pending_close_days if reason == "no_answer" else tickets.solved_close_days
        rendered = self._render(
            "closed", locale, ticket=ticket, account=account, reason=reason, days=days,
            reopen_days=tickets.reopen_days, us_transfer=self._us_transfer(session, ticket),
            full_notice=self._notice_due(account),
        )
        return self._enqueue(
            session, "closed", rendered, locale, _to(account.name, account.email),
            ticket=ticket, parent=None, auto="auto-generated",
            principal=principal_of_account(account.id),  # type: ignore[arg-type]
            automatic=True,
        )

    def tell_agents_new_ticket(
        self, session: Session, *, ticket: Ticket, account: Account, company: Company,
        message: Message, agents: list[Agent],
    ) -> list[Outbox]:
        """Tell each agent about a new ticket, with the customer's message and attachments."""
        return self._tell_agents(session, "new_ticket", ticket, account, company, message, agents)

    def tell_agents_followup(
        self, session: Session, *, ticket: Ticket, account: Account, company: Company,
        message: Message, agents: list[Agent],
    ) -> list[Outbox]:
        """Tell each agent about a customer's follow-up on a ticket."""
        return self._tell_agents(session, "followup", ticket, account, company, message, agents)

    def relay_answer(
        self, session: Session, *, ticket: Ticket, account: Account, agent: Agent,
        message: Message,
    ) -> Outbox:
        """Send an agent's answer to the customer, from the desk's address in the agent's name."""
        desk = self.settings.desk
        locale = self._locale(account.locale)
        rendered = self._render(
            "answer", locale, ticket=ticket, account=account, agent=agent, message=message,
            us_transfer=self._us_transfer(session, ticket), full_notice=self._notice_due(account),
        )
        # The agent's own address stays private: replies must come back through the desk.
        name = f"{_one_line(agent.name)} via {_one_line(desk.name)}"
        sender = Address(name, addr_spec=desk.address)
        return self._enqueue(
            session, "answer", rendered, locale, _to(account.name, account.email),
            ticket=ticket, parent=message, sender=sender, files=_attachment_rows(session, message),
            principal=principal_of_account(account.id),  # type: ignore[arg-type]
        )

    def answer_unknown_sender(
        self, session: Session, *, address: str, locale: str | None
    ) -> Outbox:
        """Tell an address that is no active account how to get one (ValueError if unusable)."""
        # Only the address is given, never the mail: a forged sender gets nothing that a
        # spammer wrote, so the desk cannot be used to relay spam.
        to = _to("", address)
        chosen = self._locale(locale)
        rendered = self._render("unknown_sender", chosen, address=to.addr_spec, us_transfer=False)
        return self._enqueue(
            session, "unknown_sender", rendered, chosen, to,
            ticket=None, parent=None, auto="auto-replied", automatic=True,
        )

    def tell_agent_refused(
        self, session: Session, *, agent: Agent, reason: str, ticket: Ticket | None
    ) -> Outbox:
        """Tell an agent, at their own address, that a mail in their name was not acted on."""
        locale = self._agent_locale(agent)
        rendered = self._render("agent_refused", locale, agent=agent, reason=reason,
                                refused_ticket=ticket)
        # No ticket, hence no reply address: the notice is not a way into the ticket.
        return self._enqueue(
            session, "agent_refused", rendered, locale, _to(agent.name, agent.email),
            ticket=None, parent=None, auto="auto-replied", automatic=True,
        )

    def tell_too_large(
        self, session: Session, *, account: Account, size: int, limit: int
    ) -> Outbox:
        """Tell a customer that their mail was over the size limit and was not filed."""
        locale = self._locale(account.locale)
        rendered = self._render(
            "too_large", locale, account=account, size_mb=f"{size / 2**20:.1f}",
            limit_mb=f"{limit / 2**20:.0f}", us_transfer=False,
            full_notice=self._notice_due(account),
        )
        return self._enqueue(
            session, "too_large", rendered, locale, _to(account.name, account.email),
            ticket=None, parent=None, auto="auto-replied", automatic=True,
        )

    def tell_agents_undeliverable(
        self, session: Session, *, ticket: Ticket, agents: list[Agent], recipient: str,
        status: str, diagnostic: str,
    ) -> list[Outbox]:
        """Tell the ticket's agents that a mail to the customer bounced for good."""
        sent = []
        for agent in agents:
            locale = self._agent_locale(agent)
            rendered = self._render(
                "undeliverable", locale, ticket=ticket, agent=agent, recipient=recipient,
                status=status, diagnostic=diagnostic,
            )
            sent.append(self._enqueue(
                session, "undeliverable", rendered, locale, _to(agent.name, agent.email),
                # No reply address: this notice is not a way to answer the customer.
                ticket=ticket, parent=None, auto="auto-generated",
            ))
        return sent

    def compose(
        self, session: Session, kind: str, *, to_name: str, to_address: str, locale: str | None,
        ticket: Ticket | None = None, automatic: bool = False, **context: Any,
    ) -> Outbox:
        """Render templates `<locale>/<kind>.*` with `context` and enqueue the mail.

        For mails outside a ticket's conversation (a welcome, a copy to the DPO): no reply
        address is issued, so an answer reaches the desk's plain address.
        """
        chosen = self._locale(locale)
        context.setdefault("us_transfer", False)
        rendered = self._render(kind, chosen, ticket=ticket, **context)
        return self._enqueue(
            session, kind, rendered, chosen, _to(to_name, to_address), ticket=ticket,
            parent=None, auto="auto-generated", automatic=automatic,
        )

    def _notice_due(self, account: Account) -> bool:
        # The full notice goes with the first mail a person gets from us if no welcome carried
        # it (accounts created before welcomes existed): Art. 14(3)(b) at the latest.
        if account.notice_sent_at is not None:
            return False
        account.notice_sent_at = utcnow()
        return True

    def warm(self) -> None:
        """Compile every template now, so that the first mail after a start is not slowed."""
        for name in self.env.list_templates(extensions=["j2"]):
            self.env.get_template(name)

    def _agent_locale(self, agent: Agent) -> str:
        # Agents have no locale of their own: the US team reads English, the others the
        # desk's language.
        return "en" if agent.region.upper() == "US" else self.settings.desk.locale

    def agent_locale(self, agent: Agent) -> str:
        """The language an agent reads: English for the US team, else the desk's."""
        return self._agent_locale(agent)

    def _tell_agents(
        self, session: Session, kind: str, ticket: Ticket, account: Account, company: Company,
        message: Message, agents: list[Agent],
    ) -> list[Outbox]:
        # Staff in the US may see a company's data only under its after-hours subscription; a
        # wrong agent list is a bug upstream, and failing loudly beats a silent transfer.
        if not company.after_hours and any(a.region.upper() == "US" for a in agents):
            raise ValueError(f"company {company.id} has no after-hours support: no US agents")
        # Agents get the files themselves, not only their names: they answer from their mail
        # client and have nowhere else to open them.
        files = _attachment_rows(session, message)
        attachments = [{"name": row.filename, "inline": row.inline} for row in files]
        # The agent's copy shows whom the ticket is assigned to, and how to work it by mail.
        assignee = session.get(Agent, ticket.assignee_id) if ticket.assignee_id else None
        # Every agent's copy joins the same thread, which ends at the customer's message (the
        # copies, newer than it, are never part of it): read once for all of them.
        thread = None
        if agents and ticket.id is not None:
            thread = _thread(session, ticket.id, message.message_id)
        sent = []
        for agent in agents:
            locale = self._agent_locale(agent)
            rendered = self._render(
                kind, locale, ticket=ticket, account=account, company=company, message=message,
                agent=agent, attachments=attachments, assignee=assignee,
                commands_help=valid_commands_help(locale).splitlines()[0],
            )
            sent.append(self._enqueue(
                session, kind, rendered, locale, _to(agent.name, agent.email),
                ticket=ticket, parent=message, auto="auto-generated", files=files,
                principal=principal_of_agent(agent.id),  # type: ignore[arg-type]
                thread=thread,
            ))
            # The access log: who received this ticket's content, when, from which region.
            if not SILENCED.get():
                record_delivery(session, agent=agent, ticket_id=ticket.id,  # type: ignore[arg-type]
                                kind=kind)
        return sent

    def _locale(self, wanted: str | None) -> str:
        code = (wanted or "").strip().lower()[:2]
        return code if code in LOCALES else self.settings.desk.locale

    def _us_transfer(self, session: Session, ticket: Ticket) -> bool:
        # The footer mentions the transfer to US staff only to customers it applies to.
        company = session.get(Company, ticket.company_id)
        return bool(company and company.after_hours)

    def _render(self, name: str, locale: str, **context: Any) -> _Rendered:
        ticket = context.get("ticket")
        tag = f"[#{ticket.id}]" if ticket is not None else ""
        context.setdefault("full_notice", False)
        context.update(
            desk=self.settings.desk, privacy=self.settings.privacy, locale=locale, tag=tag,
            reply_marker=REPLY_ABOVE_MARKER,
            topic=_one_line(ticket.subject.replace(tag, "")) if ticket is not None else "",
        )

        def render(suffix: str) -> str:
            return self.env.get_template(f"{locale}/{name}.{suffix}").render(context)

        text = render("txt.j2").strip("\n") + "\n"
        return _Rendered(_one_line(render("subject.j2")), text, render("html.j2"))

    def _enqueue(
        self, session: Session, kind: str, rendered: _Rendered, locale: str, to: Address, *,
        ticket: Ticket | None, parent: Message | None, auto: str | None = None,
        sender: Address | None = None, files: Sequence[Attachment] = (),
        principal: str | None = None, automatic: bool = False,
        thread: tuple[str | None, list[str]] | None = None,
    ) -> Outbox:
        if SILENCED.get():
            # An archive import files past mail: nobody hears of it now, and the row is kept
            # out of the session so that nothing is ever sent.
            return Outbox(kind=kind, message_id="", mail_from="", recipients="[]", raw=b"",
                          ticket_id=ticket.id if ticket is not None else None)
        desk = self.settings.desk
        if not kind.startswith(_AGENT_KINDS):
            # No reply address issued to an agent may reach a customer, whatever the text
            # relayed or quoted: any address of ours left in it becomes the plain desk address.
            rendered = _Rendered(
                scrub_reply_addresses(rendered.subject, desk.address),
                scrub_reply_addresses(rendered.text, desk.address),
                scrub_reply_addresses(rendered.html, desk.address),
            )
        # The idstring marks our own Message-IDs, so that one coming back is recognised.
        message_id = make_msgid(idstring="maildesk", domain=desk.domain)
        in_reply_to: str | None = None
        references: list[str] = []
        reply_to: tuple[str, str] | None = None
        if ticket is not None:
            if ticket.id is None:
                raise ValueError("the ticket has no id yet: flush it before notifying")
            parent_id = parent.message_id if parent is not None else None
            in_reply_to, references = thread or _thread(session, ticket.id, parent_id)
            if principal is not None:
                signed = reply_address(
                    self.reply_keys, desk.address, ticket.id, principal, ticket.reply_epoch
                )
                reply_to = (_one_line(desk.name), signed)
        sender = sender or Address(_one_line(desk.name), addr_spec=desk.address)
        # The MIME form is built by the sender, outside this transaction (see compose.py).
        draft = Draft(
            message_id=message_id, date=format_datetime(utcnow()),
            sender=(sender.display_name, sender.addr_spec), to=(to.display_name, to.addr_spec),
            subject=rendered.subject, text=rendered.text, html=rendered.html,
            language=locale, loop=desk.domain, in_reply_to=in_reply_to,
            references=tuple(references), reply_to=reply_to, auto=auto,
            files=tuple(DraftFile(row.sha256, row.content_type, row.filename) for row in files),
        )
        # A VERP return path names this very mail in any bounce that comes back.
        verp = secrets.token_hex(8)
        local, _, domain = desk.address.rpartition("@")
        outbox = Outbox(
            kind=kind, message_id=message_id, mail_from=f"{local}+bounce-{verp}@{domain}",
            recipients=json.dumps([to.addr_spec]), raw=b"", draft=draft.to_json(),
            ticket_id=ticket.id if ticket is not None else None,
            automatic=automatic, mailbox_key=mailbox_key(to.addr_spec), verp=verp,
        )
        # Never committed here: the caller's transaction decides for the mail and its cause.
        # Nor flushed: the next query or the commit writes it, with the mail's other rows.
        session.add(outbox)
        claim_for_sender(outbox, session.get_bind())
        return outbox


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Within the block, notifications are rendered but never queued."""
    token = SILENCED.set(True)
    try:
        yield
    finally:
        SILENCED.reset(token)


def _to(name: str, address: str) -> Address:
    # The email package reports unusable addresses as assorted errors (an empty one even as an
    # IndexError); callers get one ValueError, meaning "nothing can be sent there".
    try:
        return Address(_one_line(name), addr_spec=address.strip())
    except (ValueError, IndexError):
        raise ValueError(f"cannot send mail to {address!r}") from None


def _attachment_rows(session: Session, message: Message) -> list[Attachment]:
    if message.id is None:
        return []
    query = select(Attachment).where(Attachment.message_id == message.id)
    return list(session.exec(query.order_by(col(Attachment.id))))


def _thread(
    session: Session, ticket_id: int, parent_id: str | None
) -> tuple[str | None, list[str]]:
    """In-Reply-To and References for a mail about a ticket: its thread in order, parent last."""
    # One query for both halves of the thread: what came in and what went out.
    both: sa.CompoundSelect = sa.union_all(
        sa.select(col(Message.created_at), sa.literal(0), col(Message.message_id)).where(
            col(Message.ticket_id) == ticket_id
        ),
        sa.select(col(Outbox.created_at), sa.literal(1), col(Outbox.message_id)).where(
            col(Outbox.ticket_id) == ticket_id
        ),
    )
    # In time order, a mail that came in before one that went out at the same instant.
    rows = sorted(session.execute(both).all(), key=lambda row: (row[0], row[1]))
    ordered = [mid for _, _, mid in rows if mid]
    ids = [mid for mid in dict.fromkeys(ordered) if _MSG_ID.fullmatch(mid)]
    parent = parent_id if parent_id and _MSG_ID.fullmatch(parent_id) else None
    if parent is not None:
        # Clients read References as a chain of ancestors ending with the parent, so mails
        # newer than the parent (its other replies) would misplace it in the thread.
        if parent in ids:
            ids = ids[: ids.index(parent)]
        ids.append(parent)
    if len(ids) > MAX_REFERENCES:
        ids = [ids[0], *ids[-(MAX_REFERENCES - 1) :]]
    return parent, ids
