"""Transports: how a rendered mail leaves, over SMTP to a relay or into a local maildir.

SMTP sends the stored bytes as they are; the maildir, written for people and local tools, gets
a copy whose text parts are 8-bit UTF-8 instead of quoted-printable. Their failures are sorted
into temporary ones, which a later attempt may overcome, and permanent ones.
"""

from __future__ import annotations

import mailbox
import re
import smtplib
import ssl
from collections.abc import Callable
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

from maildesk import oauth2
from maildesk.config import Settings


class TemporaryFailure(Exception):
    """A failure that a later attempt may overcome; the message is a short reason."""


class PermanentFailure(Exception):
    """A failure that no retry can fix; the message is a short reason."""


class Unreachable(TemporaryFailure):
    """The server could not be reached or refused us before any mail was offered."""


def reply_text(code: int, message: bytes | str) -> str:
    """A server reply as short text, never more than one line of it."""
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    return f"{code} {' '.join(text.split())}"[:300]


def describe(exc: BaseException) -> str:
    """An exception as a short reason, fit for last_error and the log."""
    return f"{type(exc).__name__}: {exc}"[:300]


class SmtpTransport:
    """One SMTP connection, opened on first use and reused for the whole batch."""

    def __init__(
        self, settings: Settings, timeout: float, tls_context: Callable[[], ssl.SSLContext]
    ) -> None:
        self._smtp = settings.smtp
        # EHLO with the desk's own domain: smtplib's default, socket.getfqdn(), can stall.
        self._helo = settings.desk.domain
        self._timeout = timeout
        self._tls_context = tls_context
        self._client: smtplib.SMTP | None = None

    def _connect(self) -> smtplib.SMTP:
        cfg = self._smtp
        try:
            if cfg.tls == "ssl":
                client: smtplib.SMTP = smtplib.SMTP_SSL(
                    cfg.host, cfg.port, self._helo, timeout=self._timeout,
                    context=self._tls_context(),
                )  # fmt: skip
            else:
                client = smtplib.SMTP(cfg.host, cfg.port, self._helo, timeout=self._timeout)
            try:
                if cfg.tls == "starttls":
                    client.starttls(context=self._tls_context())
                if cfg.username and cfg.auth == "xoauth2":
                    oauth2.smtp_login(client, cfg.username, oauth2.source_for(cfg))
                elif cfg.username:
                    secret = cfg.password.get_secret_value() if cfg.password else ""
                    client.login(cfg.username, secret)
            except BaseException:
                client.close()
                raise
        # No access token is no fault of the mail either: the endpoint may be down for now.
        except oauth2.TokenError as exc:
            raise Unreachable(f"connect: no access token: {exc}") from None
        # A refusal here (a bad login, say) is no fault of the mail, so it is never permanent.
        except smtplib.SMTPResponseException as exc:
            raise Unreachable(f"connect: {reply_text(exc.smtp_code, exc.smtp_error)}") from None
        except (smtplib.SMTPException, OSError) as exc:
            raise Unreachable(f"connect to {cfg.host}:{cfg.port}: {describe(exc)}") from None
        return client

    def send(self, mail_from: str, recipients: list[str], raw: bytes | Path) -> dict[str, Any]:
        """Send a mail (its bytes, or a file holding them); the recipients refused one by one."""
        # smtplib closes its socket itself after some errors (a 421, a lost connection).
        if self._client is not None and self._client.sock is None:
            self._client = None
        if self._client is None:
            self._client = self._connect()
        try:
            if isinstance(raw, Path):
                return send_file(self._client, mail_from, recipients, raw)
            return self._client.sendmail(mail_from, recipients, raw)
        except smtplib.SMTPRecipientsRefused as exc:
            reason = "all recipients refused: " + refusals(exc.recipients)
            if all(code >= 500 for code, _ in exc.recipients.values()):
                raise PermanentFailure(reason) from None
            raise TemporaryFailure(reason) from None
        except smtplib.SMTPResponseException as exc:
            reason = reply_text(exc.smtp_code, exc.smtp_error)
            if 500 <= exc.smtp_code < 600:
                raise PermanentFailure(reason) from None
            raise TemporaryFailure(reason) from None
        except (smtplib.SMTPException, OSError) as exc:
            self.close()
            raise TemporaryFailure(f"connection lost: {describe(exc)}") from None

    def still_open(self) -> bool:
        """Whether a connection kept from an earlier batch still answers (a NOOP); if it does
        not, it is dropped, and the next mail opens a new one."""
        if self._client is None:
            return False
        try:
            code, _ = self._client.noop()
        except (smtplib.SMTPException, OSError):
            code = 0
        if code == 250:
            return True
        self._client.close()
        self._client = None
        return False

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.quit()
            except (smtplib.SMTPException, OSError):
                self._client.close()
            self._client = None


_PIECE_BYTES = 1024 * 1024
_LEADING_DOT = re.compile(rb"(?m)^\.")


def send_file(
    client: smtplib.SMTP, mail_from: str, recipients: list[str], path: Path
) -> dict[str, Any]:
    """smtplib's sendmail() for a mail kept in a file, which is read and sent a piece at a time.

    smtplib takes a mail only whole, and copies it twice more to end lines and double dots; a
    mail carrying a 20 MB attachment would be held four times over. The envelope, the replies
    and the exceptions are sendmail()'s (the caller sorts them out); only DATA is streamed.
    """
    client.ehlo_or_helo_if_needed()
    sized = client.does_esmtp and client.has_extn("size")
    code, reply = client.mail(mail_from, [f"size={path.stat().st_size}"] if sized else [])
    if code != 250:
        _end_transaction(client, code)
        raise smtplib.SMTPSenderRefused(code, reply, mail_from)
    refused: dict[str, Any] = {}
    for recipient in recipients:
        code, reply = client.rcpt(recipient)
        if code not in (250, 251):
            refused[recipient] = (code, reply)
        if code == 421:
            client.close()
            raise smtplib.SMTPRecipientsRefused(refused)
    if len(refused) == len(recipients):
        client.rset()
        raise smtplib.SMTPRecipientsRefused(refused)
    code, reply = client.docmd("DATA")
    if code != 354:
        raise smtplib.SMTPDataError(code, reply)
    last = b"\n"
    with open(path, "rb") as mail:
        carry = b""
        while piece := mail.read(_PIECE_BYTES):
            # Whole lines only, so that every line start is seen: those with a dot get two.
            piece = carry + piece
            cut = piece.rfind(b"\n") + 1
            lines, carry = piece[:cut], piece[cut:]
            if lines:
                client.send(_LEADING_DOT.sub(b"..", lines))
                last = lines[-1:]
        if carry:
            client.send(_LEADING_DOT.sub(b"..", carry) + b"\r\n")
            last = b"\n"
    client.send(b".\r\n" if last == b"\n" else b"\r\n.\r\n")
    code, reply = client.getreply()
    if code != 250:
        _end_transaction(client, code)
        raise smtplib.SMTPDataError(code, reply)
    return refused


def _end_transaction(client: smtplib.SMTP, code: int) -> None:
    """After a refusal, as sendmail() does: a 421 closes the connection, else RSET."""
    if code == 421:
        client.close()
    else:
        client.rset()


# Longer lines do not fit in 8bit (RFC 5322's limit); such a part keeps its encoding.
_MAX_8BIT_LINE = 998


def readable_copy(raw: bytes) -> bytes:
    """The mail with its inline text parts in 8-bit UTF-8, readable with `cat`; else `raw`.

    Headers are kept, and so is every other part; a part whose text cannot be decoded, or
    whose lines are too long for 8bit, stays as it was.
    """
    linesep = "\r\n" if b"\r\n" in raw else "\n"
    mail_policy = policy.default.clone(linesep=linesep)
    message = message_from_bytes(raw, policy=mail_policy)
    changed = False
    for part in message.walk():
        if (
            part.is_multipart()
            or part.get_content_maintype() != "text"
            or part.get_content_disposition() == "attachment"
            or part.get("Content-Transfer-Encoding", "7bit").lower() in ("7bit", "8bit")
        ):
            continue
        try:
            text = part.get_content()
        except (LookupError, ValueError):
            continue  # An unknown charset, say: left as it is.
        if any(len(line.encode("utf-8")) > _MAX_8BIT_LINE for line in text.splitlines()):
            continue
        # set_content replaces the Content-* headers, so the ones worth keeping are passed on.
        params = {
            name: value for name, value in (part.get_params(header="content-type") or [])[1:]
            if name.lower() != "charset"
        }  # fmt: skip
        part.set_content(
            text, subtype=part.get_content_subtype(), charset="utf-8", cte="8bit",
            disposition=part.get_content_disposition(), filename=part.get_filename(),
            cid=part.get("Content-ID"), params=params,
        )  # fmt: skip
        if part is not message:
            del part["MIME-Version"]  # Which set_content adds, but belongs to the top only.
        changed = True
    return message.as_bytes() if changed else raw


class MaildirTransport:
    """Mails dropped into a maildir, for a local MTA or a test to pick up.

    Its text parts are written as 8-bit UTF-8, so that a person can read the files; the SMTP
    transport sends the stored bytes as they are.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._box: mailbox.Maildir | None = None

    def send(self, mail_from: str, recipients: list[str], raw: bytes | Path) -> dict[str, Any]:
        """Drop the mail (its bytes, or a file holding them) into the maildir."""
        try:
            if isinstance(raw, Path):
                raw = raw.read_bytes()  # For people to read: its text is made 8-bit below.
            if self._box is None:
                # Creating the subdirectories too accepts an empty directory made by hand.
                for sub in ("tmp", "new", "cur"):
                    (self._path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
                self._box = mailbox.Maildir(self._path, create=True)
            # Maildir writes into tmp/ and then renames into new/, so no reader ever sees a
            # half-written file; line endings are kept as they are.
            self._box.add(readable_copy(raw))
        except OSError as exc:
            raise TemporaryFailure(f"maildir: {describe(exc)}") from None
        return {}

    def close(self) -> None:
        self._box = None


def refusals(refused: dict[str, Any]) -> str:
    """The refused recipients and their servers' replies, as one short line."""
    return ", ".join(f"{addr} ({reply_text(code, msg)})" for addr, (code, msg) in refused.items())
