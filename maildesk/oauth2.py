"""OAuth 2.0 for IMAP and SMTP (XOAUTH2): access tokens from a refresh token, kept until expiry.

Gmail and Microsoft 365 take an access token instead of a password. The token comes from the
provider's token endpoint (`grant_type=refresh_token`), lives about an hour, and is refreshed a
margin before it expires; a server that refuses it anyway (revoked early, or a clock off) gets
one freshly refreshed token, never more, so that a bad refresh token cannot hammer the endpoint.

One token source serves a set of credentials for the whole process: the IMAP fetcher, every
outbox batch and `maildesk check` ask it, and share the token it holds. No token or secret is
ever logged; they stay SecretStr until the moment they go on the wire. This module imports no
ingress, outbound, store or CLI module, so that both ingress and outbound can use it.
"""

from __future__ import annotations

import json
import smtplib
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from imapclient import IMAPClient
from imapclient.exceptions import LoginError
from pydantic import SecretStr

from maildesk.config import ImapSettings, SmtpSettings
from maildesk.logs import get_logger

log = get_logger("oauth2")

Clock = Callable[[], float]
T = TypeVar("T")

# A token is refreshed this long before the endpoint said it expires, so that a login started
# just before expiry does not reach the server with a dead token.
EXPIRY_MARGIN_SECONDS = 120.0
# The life assumed when the endpoint gives no expires_in (RFC 6749 makes it optional).
DEFAULT_LIFETIME_SECONDS = 3600.0
REQUEST_TIMEOUT = 15.0  # seconds for one request to the token endpoint
MAX_RESPONSE_BYTES = 64 * 1024  # a token response is a few kilobytes at most


class TokenError(Exception):
    """No access token: the endpoint refused (`refused`) or could not be reached.

    The message names the endpoint and what it answered, never a token or a secret.
    """

    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        # True when the endpoint answered no (invalid_grant, say): only the operator can fix
        # that; False for a network failure or a server error, which a later try may overcome.
        self.refused = refused


@dataclass(frozen=True)
class OAuth2Client:
    """Where and how to ask for access tokens: the endpoint and the client's credentials."""

    token_url: str
    client_id: str
    refresh_token: SecretStr
    client_secret: SecretStr | None = None
    scope: str | None = None

    @classmethod
    def from_settings(cls, settings: ImapSettings | SmtpSettings) -> OAuth2Client:
        """The client that an [imap] or [smtp] section with auth = "xoauth2" describes."""
        # The config's validation makes these present whenever auth is "xoauth2".
        if (
            settings.oauth2_token_url is None
            or settings.oauth2_client_id is None
            or settings.oauth2_refresh_token is None
        ):
            raise ValueError("XOAUTH2 needs oauth2_token_url, oauth2_client_id and a refresh token")
        return cls(
            token_url=settings.oauth2_token_url,
            client_id=settings.oauth2_client_id,
            refresh_token=settings.oauth2_refresh_token,
            client_secret=settings.oauth2_client_secret,
            scope=settings.oauth2_scope,
        )

    @property
    def endpoint(self) -> str:
        """The token endpoint as it may be logged: no user info, no query."""
        parts = urllib.parse.urlsplit(self.token_url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


def xoauth2_string(user: str, token: str) -> str:
    """The XOAUTH2 initial client response (before base64), as Google and Microsoft define it."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


class TokenSource:
    """Access tokens for one client: refreshed before expiry, and on demand after a refusal.

    `clock` gives seconds on a monotonic scale (time.monotonic by default); tests pass their own
    to make a token expire without waiting. Safe to use from several threads at once.
    """

    def __init__(
        self, client: OAuth2Client, *, clock: Clock = time.monotonic,
        margin: float = EXPIRY_MARGIN_SECONDS, timeout: float = REQUEST_TIMEOUT,
    ) -> None:  # fmt: skip
        """Remember the client; the first token is asked for on first use."""
        self.client = client
        self._clock = clock
        self._margin = margin
        self._timeout = timeout
        self._lock = threading.Lock()
        self._token: SecretStr | None = None
        self._refresh_at = 0.0
        # Microsoft may answer with a new refresh token (rotation): the newest is used after.
        self._refresh_token = client.refresh_token

    def token(self) -> SecretStr:
        """A valid access token: the one held, unless it is near its expiry."""
        with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                return self._refresh()
            return self._token

    def refresh(self, stale: SecretStr | None = None) -> SecretStr:
        """A new access token; with `stale`, only if another caller has not replaced it yet."""
        with self._lock:
            if stale is not None and self._token is not None and self._token != stale:
                return self._token
            return self._refresh()

    def _refresh(self) -> SecretStr:
        """Ask the endpoint for a new access token (the lock is held)."""
        client = self.client
        form = {
            "grant_type": "refresh_token",
            "refresh_token": self._refresh_token.get_secret_value(),
            "client_id": client.client_id,
        }
        if client.client_secret is not None:
            form["client_secret"] = client.client_secret.get_secret_value()
        if client.scope:
            form["scope"] = client.scope
        # The token's life is counted from before the request: it cannot have started earlier.
        asked_at = self._clock()
        answer = self._post(form)
        token = answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise TokenError(f"{client.endpoint} answered without an access_token", refused=False)
        kind = answer.get("token_type", "Bearer")
        if not isinstance(kind, str) or kind.lower() != "bearer":
            raise TokenError(f"{client.endpoint} gave a {kind!r} token, not a Bearer one",
                             refused=True)  # fmt: skip
        lifetime = _seconds(answer.get("expires_in"))
        rotated = answer.get("refresh_token")
        if isinstance(rotated, str) and rotated:
            self._refresh_token = SecretStr(rotated)
        # A token shorter-lived than twice the margin is kept for half its life instead.
        self._refresh_at = asked_at + lifetime - min(self._margin, lifetime / 2)
        self._token = SecretStr(token)
        log.info("oauth2.refreshed", endpoint=client.endpoint, expires_in=round(lifetime))
        return self._token

    def _post(self, form: dict[str, str]) -> dict[str, Any]:
        """POST the form to the token endpoint and return its JSON object."""
        endpoint = self.client.endpoint
        # urllib would also open file: and ftp: addresses; a token endpoint is on the web.
        if urllib.parse.urlsplit(self.client.token_url).scheme not in ("https", "http"):
            raise TokenError(f"{endpoint} is not an http(s) address", refused=True)
        request = urllib.request.Request(  # noqa: S310 (the scheme is checked above)
            self.client.token_url, data=urllib.parse.urlencode(form).encode("ascii"),
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "Accept": "application/json"},
            method="POST",
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
                body = response.read(MAX_RESPONSE_BYTES)
        except urllib.error.HTTPError as exc:
            with exc:
                said = _error_words(exc.read(MAX_RESPONSE_BYTES))
            # 4xx is the endpoint's no to these credentials; 5xx its own trouble.
            raise TokenError(f"{endpoint} answered {exc.code}{said}",
                             refused=400 <= exc.code < 500) from None  # fmt: skip
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise TokenError(f"cannot reach {endpoint}: {reason}", refused=False) from None
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise TokenError(f"{endpoint} answered something that is not a JSON object",
                             refused=False)  # fmt: skip
        return answer


def _seconds(value: Any) -> float:
    """expires_in as seconds: a number, or a numeric string (as some endpoints send)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return DEFAULT_LIFETIME_SECONDS
    return seconds if seconds > 0 else DEFAULT_LIFETIME_SECONDS


def _error_words(body: bytes) -> str:
    """`: invalid_grant (the description)` from an RFC 6749 error response, or nothing."""
    try:
        answer = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(answer, dict) or not isinstance(answer.get("error"), str):
        return ""
    words = f": {answer['error']}"
    description = answer.get("error_description")
    if isinstance(description, str) and description:
        # Descriptions are for people and never carry the token; one short line is enough.
        words += f" ({' '.join(description.split())[:200]})"
    return words


_shared: dict[OAuth2Client, TokenSource] = {}
_shared_lock = threading.Lock()


def shared_source(client: OAuth2Client, *, clock: Clock | None = None) -> TokenSource:
    """The process's one token source for this client; `clock` is used if it is made now."""
    with _shared_lock:
        source = _shared.get(client)
        if source is None:
            source = _shared[client] = TokenSource(client, clock=clock or time.monotonic)
        return source


def source_for(settings: ImapSettings | SmtpSettings) -> TokenSource:
    """The shared token source for an [imap] or [smtp] section with auth = "xoauth2"."""
    return shared_source(OAuth2Client.from_settings(settings))


def authenticate(
    source: TokenSource, attempt: Callable[[str], T],
    refused: type[BaseException] | tuple[type[BaseException], ...],
) -> T:  # fmt: skip
    """Log in with `attempt(token)`; if the server raises `refused`, refresh once and retry."""
    token = source.token()
    try:
        return attempt(token.get_secret_value())
    except refused:
        # Revoked before its time, or the server's clock disagrees: one fresh token may do.
        log.info("oauth2.refused", endpoint=source.client.endpoint, action="refreshing once")
    return attempt(source.refresh(stale=token).get_secret_value())


def imap_login(client: IMAPClient, user: str, source: TokenSource) -> None:
    """AUTHENTICATE XOAUTH2 on an IMAP connection; LoginError if the server refuses twice."""
    authenticate(source, lambda token: client.oauth2_login(user, token), LoginError)


def smtp_login(client: smtplib.SMTP, user: str, source: TokenSource) -> None:
    """AUTH XOAUTH2 on an SMTP session; SMTPAuthenticationError if the relay refuses twice."""
    client.ehlo_or_helo_if_needed()
    if "XOAUTH2" not in client.esmtp_features.get("auth", "").upper().split():
        # Without this the relay's 504 would be taken for a refused token, and refreshed for.
        raise smtplib.SMTPNotSupportedError("the relay offers no AUTH XOAUTH2")

    def attempt(token: str) -> None:
        def respond(challenge: bytes | None = None) -> str:
            # A challenge after the token is the server's error report (a JSON object, in
            # base64): RFC 7628 has the client answer it with an empty line.
            return "" if challenge is not None else xoauth2_string(user, token)

        client.auth("XOAUTH2", respond, initial_response_ok=True)

    authenticate(source, attempt, smtplib.SMTPAuthenticationError)
