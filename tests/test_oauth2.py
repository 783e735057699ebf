"""XOAUTH2 against real servers: a token and introspection endpoint of the test's own (http.server
on loopback), a Dovecot whose oauth2 passdb asks that endpoint about every token, and an aiosmtpd
relay whose AUTH XOAUTH2 checks tokens against it too. Expiry is driven by an injected clock,
never by sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import secrets
import subprocess
import sys
import threading
import tomllib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session
from imapclient.exceptions import LoginError
from pydantic import SecretStr
from rig.dovecot import DovecotServer, ImapAccount, free_port
from rig.smtp import RecordingSMTPServer
from structlog.testing import capture_logs

from maildesk import oauth2
from maildesk.config import ConfigError, ImapSettings, Settings, parse_settings
from maildesk.ingress.fetch import ImapFetcher
from maildesk.logs import configure_logging
from maildesk.oauth2 import OAuth2Client, TokenError, TokenSource
from maildesk.outbound.transport import SmtpTransport, Unreachable
from maildesk.store.intake import Accepted, Arrival

MAILDESK = Path(sys.executable).parent / "maildesk"
MAIL = b"From: a@example.test\r\nTo: support@desk.example\r\nSubject: Hi\r\n\r\nHello.\r\n"


class Clock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Endpoint:
    """The provider's side: issues access tokens for refresh tokens, and answers introspection.

    `grants` holds every token request's form; `introspected` every token Dovecot asked about.
    """

    client_secret: str = field(default_factory=lambda: f"cs-{secrets.token_hex(8)}")
    expires_in: int = 3600
    rotate: bool = False
    born_revoked: bool = False  # issue tokens that no server accepts
    grants: list[dict[str, str]] = field(default_factory=list)
    introspected: list[str] = field(default_factory=list)
    owners: dict[str, str] = field(default_factory=dict)  # refresh token -> user
    active: dict[str, str] = field(default_factory=dict)  # access token -> user
    issued: list[str] = field(default_factory=list)
    issued_to: dict[str, list[str]] = field(default_factory=dict)  # user -> access tokens
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def refresh_token_for(self, user: str) -> str:
        """A refresh token that maildesk's operator would have obtained for `user`."""
        token = f"rt-{secrets.token_hex(12)}"
        self.owners[token] = user
        return token

    def revoke(self, token: str) -> None:
        self.active.pop(token, None)

    def grant(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        self.grants.append(form)
        user = self.owners.get(form.get("refresh_token", ""))
        if form.get("grant_type") != "refresh_token" or form.get("client_id") != "desk-client":
            return 400, {"error": "invalid_request"}
        if form.get("client_secret") != self.client_secret:
            return 401, {"error": "invalid_client"}
        if user is None:
            return 400, {"error": "invalid_grant", "error_description": "Token has been revoked."}
        token = f"at-{len(self.issued) + 1}-{secrets.token_hex(8)}"
        self.issued.append(token)
        self.issued_to.setdefault(user, []).append(token)
        if not self.born_revoked:
            self.active[token] = user
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer",
                                  "expires_in": self.expires_in}
        if self.rotate:
            answer["refresh_token"] = self.refresh_token_for(user)
        return 200, answer


def _handler(endpoint: Endpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            if self.path == "/token":
                status, answer = endpoint.grant(form)
            else:  # /introspect, asked by Dovecot's oauth2 passdb
                token = form.get("token", "")
                endpoint.introspected.append(token)
                user = endpoint.active.get(token)
                status, answer = 200, {"active": user is not None, "username": user or ""}
            body = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Endpoint]:
    """The token and introspection endpoint, for this module's Dovecot and tests."""
    state = Endpoint()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _fresh_endpoint(endpoint: Endpoint) -> None:
    """Each test starts with no records and the endpoint's default behaviour."""
    endpoint.grants.clear()
    endpoint.introspected.clear()
    endpoint.expires_in, endpoint.rotate, endpoint.born_revoked = 3600, False, False


@pytest.fixture(scope="module")
def oauth2_dovecot(endpoint: Endpoint) -> Iterator[DovecotServer]:
    """A Dovecot of this module's own whose oauth2 passdb introspects with `endpoint`."""
    server = DovecotServer(oauth2_args=(
        "introspection_mode = post\n"
        f"introspection_url = {endpoint.url}/introspect\n"
        "username_attribute = username\n"
        "active_attribute = active\n"
        "active_value = true\n"
    ))  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.stop()


def oauth2_keys(endpoint: Endpoint, refresh_token: str) -> dict[str, Any]:
    """The XOAUTH2 keys of [imap] or [smtp] for this refresh token."""
    return {"auth": "xoauth2", "oauth2_token_url": f"{endpoint.url}/token",
            "oauth2_client_id": "desk-client", "oauth2_client_secret": endpoint.client_secret,
            "oauth2_refresh_token": refresh_token}  # fmt: skip


class Intake:
    """The store's side of the fetcher, in memory: every mail is filed as a ticket at once."""

    def __init__(self) -> None:
        self.raws: list[bytes] = []

    def store(self, arrivals: list[Arrival]) -> list[Accepted]:
        self.raws += [arrival.raw for arrival in arrivals]
        return [Accepted(len(self.raws) - len(arrivals) + i + 1, False)
                for i in range(len(arrivals))]  # fmt: skip

    def raw_writer(self) -> None:
        return None  # Large mails are fetched whole, so that their bytes are in the arrival.

    def checkpoint(self, mailbox: str, uidvalidity: int, uids: list[int]) -> dict[int, int]:
        return {}

    def outcomes(self, ids: list[int]) -> dict[int, str]:
        return dict.fromkeys(ids, "ticket")


def fetch(settings: ImapSettings) -> Intake:
    """Connect, log in and take every waiting mail, as the daemon's fetcher does."""
    intake = Intake()
    fetcher = ImapFetcher(settings, intake, max_mail_bytes=1 << 20)

    async def once() -> None:
        try:
            await fetcher.fetch_once()
        finally:
            await fetcher.close()

    asyncio.run(once())
    return intake


def imap_settings(endpoint: Endpoint, oauth2_dovecot: DovecotServer) -> ImapSettings:
    """[imap] for a new user of the oauth2 Dovecot, with XOAUTH2 and a refresh token of its own."""
    account = oauth2_dovecot.add_user()
    keys = oauth2_keys(endpoint, endpoint.refresh_token_for(account.username))
    return ImapSettings(enabled=True, host=account.host, port=account.port, tls="none",
                        username=account.username, password=SecretStr(account.password),
                        **keys)  # fmt: skip


def append(settings: ImapSettings) -> None:
    """Put a mail in the user's INBOX, logging in with the password (PLAIN still works)."""
    assert settings.username is not None and settings.password is not None
    ImapAccount(settings.host, settings.port, settings.username,
                settings.password.get_secret_value()).append(MAIL)  # fmt: skip


# The token source and the endpoint


def test_a_token_is_kept_until_near_expiry_then_refreshed(endpoint: Endpoint) -> None:
    clock = Clock()
    refresh = endpoint.refresh_token_for("someone")
    source = TokenSource(OAuth2Client(
        f"{endpoint.url}/token", "desk-client", SecretStr(refresh),
        SecretStr(endpoint.client_secret), scope="imap offline_access",
    ), clock=clock, margin=60)  # fmt: skip
    first = source.token()
    clock.now += 3600 - 60 - 1
    assert source.token() == first
    assert endpoint.grants == [{"grant_type": "refresh_token", "refresh_token": refresh,
                                "client_id": "desk-client", "scope": "imap offline_access",
                                "client_secret": endpoint.client_secret}]  # fmt: skip
    clock.now += 1
    second = source.token()
    assert (first.get_secret_value(), second.get_secret_value()) == tuple(endpoint.issued[-2:])
    assert len(endpoint.grants) == 2


def test_a_rotated_refresh_token_is_used_for_the_next_refresh(endpoint: Endpoint) -> None:
    endpoint.rotate = True
    clock = Clock()
    first = endpoint.refresh_token_for("someone")
    source = TokenSource(OAuth2Client(f"{endpoint.url}/token", "desk-client", SecretStr(first),
                                      SecretStr(endpoint.client_secret)), clock=clock)
    source.token()
    clock.now += 3600
    source.token()
    rotated = [form["refresh_token"] for form in endpoint.grants]
    assert rotated[0] == first and rotated[1] != first and endpoint.owners[rotated[1]]


def test_a_refused_or_unreachable_endpoint_is_a_token_error_without_secrets(
    endpoint: Endpoint,
) -> None:
    url, secret = f"{endpoint.url}/token", SecretStr(endpoint.client_secret)
    unknown = SecretStr("rt-nobody-has-this")
    with pytest.raises(TokenError) as refused:
        TokenSource(OAuth2Client(url, "desk-client", unknown, secret)).token()
    assert str(refused.value) == f"{url} answered 400: invalid_grant (Token has been revoked.)"
    assert refused.value.refused
    with pytest.raises(TokenError) as down:
        TokenSource(OAuth2Client(f"http://127.0.0.1:{free_port()}/token", "desk-client",
                                 unknown, secret)).token()  # fmt: skip
    assert not down.value.refused
    assert str(down.value).startswith("cannot reach http://127.0.0.1:")
    for error in (refused.value, down.value):
        assert unknown.get_secret_value() not in str(error)
        assert endpoint.client_secret not in str(error)


# IMAP against Dovecot's oauth2 passdb


def test_the_fetcher_logs_in_with_xoauth2(
    endpoint: Endpoint, oauth2_dovecot: DovecotServer
) -> None:
    # The password is there only for the test's own APPEND: the fetcher must not use it.
    settings = imap_settings(endpoint, oauth2_dovecot)
    append(settings)
    assert fetch(settings).raws == [MAIL]
    assert endpoint.introspected == endpoint.issued[-1:]
    assert len(endpoint.grants) == 1


def test_an_expired_token_is_refreshed_before_the_login(
    endpoint: Endpoint, oauth2_dovecot: DovecotServer
) -> None:
    settings = imap_settings(endpoint, oauth2_dovecot)
    clock = Clock()
    # The fetcher asks for the shared source of its credentials: this one, with the test's clock.
    oauth2.shared_source(OAuth2Client.from_settings(settings), clock=clock)
    fetch(settings)
    first = endpoint.issued[-1]
    clock.now += 3600  # The token's life is over: the server no longer takes it either.
    endpoint.revoke(first)
    append(settings)
    assert fetch(settings).raws == [MAIL]
    second = endpoint.issued[-1]
    # Refreshed ahead of the login: the dead token never reached the server again.
    assert endpoint.introspected == [first, second] and second != first
    assert len(endpoint.grants) == 2


def test_a_refused_token_is_refreshed_once(
    endpoint: Endpoint, oauth2_dovecot: DovecotServer
) -> None:
    settings = imap_settings(endpoint, oauth2_dovecot)
    fetch(settings)
    first = endpoint.issued[-1]
    endpoint.revoke(first)  # Revoked early: the clock says it is still good.
    append(settings)
    with capture_logs() as logs:
        assert fetch(settings).raws == [MAIL]
    second = endpoint.issued[-1]
    assert endpoint.introspected == [first, first, second]
    assert len(endpoint.grants) == 2
    assert [entry["event"] for entry in logs if entry["event"].startswith("oauth2.")] == [
        "oauth2.refused", "oauth2.refreshed"]
    assert not any(secret in repr(logs) for secret in (first, second, endpoint.client_secret))
    # A refreshed token that is refused too ends the login: no second refresh.
    endpoint.born_revoked = True
    endpoint.revoke(second)
    with pytest.raises(LoginError):
        fetch(settings)
    assert endpoint.introspected[3:] == [second, endpoint.issued[-1]]
    assert len(endpoint.grants) == 3


# SMTP AUTH XOAUTH2 against aiosmtpd


class XOAuth2Relay:
    """An aiosmtpd handler whose AUTH XOAUTH2 asks the endpoint whether the token is live."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.tokens: list[str] = []  # every token offered, in order
        self.mails: list[tuple[str, bytes]] = []  # (authenticated user, raw)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        fields = base64.b64decode(args[1]).decode().split("\x01")
        user, token = fields[0].removeprefix("user="), fields[1].removeprefix("auth=Bearer ")
        self.tokens.append(token)
        if self.endpoint.active.get(token) == user:
            return AuthResult(success=True, auth_data=user)
        # As Gmail does: the error as a JSON challenge, then 535 after the client's empty line.
        await server.challenge_auth(json.dumps({"status": "401", "schemes": "bearer"}))
        return AuthResult(success=False, handled=False,
                          message="535 5.7.8 Username and Password not accepted")  # fmt: skip

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.mails.append((str(session.auth_data), content))
        return "250 OK"


@pytest.fixture
def relay(endpoint: Endpoint) -> Iterator[tuple[XOAuth2Relay, int]]:
    """The XOAUTH2 relay and its port."""
    handler = XOAuth2Relay(endpoint)
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(),
                            auth_require_tls=False, auth_exclude_mechanism=["LOGIN", "PLAIN"])
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()


def smtp_settings(endpoint: Endpoint, port: int, refresh_token: str) -> Settings:
    return Settings.model_validate({
        "desk": {"address": "support@desk.example"},
        "smtp": {"transport": "smtp", "host": "127.0.0.1", "port": port, "tls": "none",
                 "username": "desk@desk.example", **oauth2_keys(endpoint, refresh_token)},
    })  # fmt: skip


def test_the_relay_takes_auth_xoauth2_and_a_refused_token_is_refreshed_once(
    endpoint: Endpoint, relay: tuple[XOAuth2Relay, int]
) -> None:
    handler, port = relay
    settings = smtp_settings(endpoint, port, endpoint.refresh_token_for("desk@desk.example"))

    def send() -> None:
        transport = SmtpTransport(settings, 10.0, lambda: pytest.fail("no TLS here"))
        try:
            transport.send("support@desk.example", ["c@example.test"], MAIL)
        finally:
            transport.close()

    send()
    first = endpoint.issued[-1]
    endpoint.revoke(first)
    send()
    second = endpoint.issued[-1]
    assert handler.tokens == [first, first, second]
    assert [user for user, _ in handler.mails] == ["desk@desk.example"] * 2
    endpoint.born_revoked = True
    endpoint.revoke(second)
    with pytest.raises(Unreachable, match=r"^connect: 535 5\.7\.8 Username and Password not"):
        send()
    assert handler.tokens[3:] == [second, endpoint.issued[-1]] and len(endpoint.grants) == 3


def test_a_relay_without_xoauth2_is_unreachable_and_asks_for_no_token(
    endpoint: Endpoint, smtp_server: RecordingSMTPServer
) -> None:
    settings = smtp_settings(endpoint, smtp_server.port, endpoint.refresh_token_for("desk"))
    transport = SmtpTransport(settings, 10.0, lambda: pytest.fail("no TLS here"))
    with pytest.raises(Unreachable, match=r"the relay offers no AUTH XOAUTH2$"):
        transport.send("support@desk.example", ["c@example.test"], MAIL)
    assert endpoint.grants == [] and smtp_server.mails == []


# maildesk check, the config, and the logs


def test_maildesk_check_logs_in_with_xoauth2(
    tmp_path: Path, endpoint: Endpoint, oauth2_dovecot: DovecotServer,
    relay: tuple[XOAuth2Relay, int],
) -> None:  # fmt: skip
    handler, port = relay
    account = oauth2_dovecot.add_user()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "client-secret").write_text(endpoint.client_secret + "\n")
    imap_refresh = endpoint.refresh_token_for(account.username)
    (credentials / "imap-refresh").write_text(imap_refresh + "\n")
    smtp_refresh = endpoint.refresh_token_for("desk@desk.example")
    (credentials / "smtp-refresh").write_text(smtp_refresh + "\n")
    oauth = (f'auth = "xoauth2"\noauth2_token_url = "{endpoint.url}/token"\n'
             'oauth2_client_id = "desk-client"\n'
             'oauth2_client_secret_file = "%d/client-secret"\n')  # fmt: skip
    config = tmp_path / "config.toml"
    config.write_text(
        f'[desk]\naddress = "support@desk.example"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[imap]\nenabled = true\nhost = "{account.host}"\nport = {account.port}\n'
        f'tls = "none"\nusername = "{account.username}"\n{oauth}'
        'oauth2_refresh_token_file = "%d/imap-refresh"\n'
        f'[smtp]\ntransport = "smtp"\nhost = "127.0.0.1"\nport = {port}\ntls = "none"\n'
        f'username = "desk@desk.example"\n{oauth}oauth2_refresh_token_file = "%d/smtp-refresh"\n'
        '[listener]\nenabled = false\n[security]\nreply_key = "a-reply-key-for-the-test"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILDESK_")}
    result = subprocess.run(
        [str(MAILDESK), "--config", str(config), "check"], capture_output=True, text=True,
        timeout=120, env={**env, "CREDENTIALS_DIRECTORY": str(credentials)},
    )  # fmt: skip
    lines = result.stdout.splitlines()
    imap, relay_at = f"127.0.0.1:{account.port} (tls none)", f"127.0.0.1:{port} (tls none)"
    assert f"ok    imap: logged in as {account.username} at {imap}; watching INBOX; " \
        "maildesk/processed created, maildesk/quarantine created" in lines
    assert f"ok    relay: {relay_at} answered EHLO, AUTH XOAUTH2 as desk@desk.example, QUIT; " \
        "no mail sent" in lines
    assert 'warn  relay: the access token travels in clear ([smtp] tls = "none"); use ' \
        "starttls or ssl" in lines
    assert sorted(form["refresh_token"] for form in endpoint.grants) == sorted(
        [imap_refresh, smtp_refresh])
    assert endpoint.introspected == endpoint.issued_to[account.username]
    assert handler.tokens == endpoint.issued_to["desk@desk.example"][-1:]
    assert handler.mails == []
    for secret in (endpoint.client_secret, imap_refresh, smtp_refresh, *endpoint.issued):
        assert secret not in result.stdout + result.stderr


def parse(text: str, base: Path) -> Settings:
    return parse_settings(tomllib.loads(text), "config.toml", base)


IMAP_ON = '[imap]\nenabled = true\nusername = "u"\nauth = "xoauth2"\n'
URL = 'oauth2_token_url = "https://oauth2.googleapis.com/token"\n'


@pytest.mark.parametrize(("text", "message"), [
    (IMAP_ON, '[imap] oauth2_token_url: missing required value (auth = "xoauth2"): the token '
     "endpoint, such as https://oauth2.googleapis.com/token"),
    (IMAP_ON + URL, '[imap] oauth2_client_id: missing required value (auth = "xoauth2"): set '
     "oauth2_client_id, oauth2_client_id_file or MAILDESK_IMAP_OAUTH2_CLIENT_ID"),
    (IMAP_ON + URL + 'oauth2_client_id = "c"\n', '[imap] oauth2_refresh_token: missing '
     'required value (auth = "xoauth2"): set oauth2_refresh_token, oauth2_refresh_token_file '
     "or MAILDESK_IMAP_OAUTH2_REFRESH_TOKEN"),
    ('[smtp]\ntransport = "smtp"\nauth = "xoauth2"\n',
     '[smtp] username: missing required value (auth = "xoauth2")'),
    ('[smtp]\ntransport = "smtp"\nusername = "u"\nauth = "xoauth2"\n' + URL
     + 'oauth2_client_id = "c"\n', '[smtp] oauth2_refresh_token: missing required value (auth '
     '= "xoauth2"): set oauth2_refresh_token, oauth2_refresh_token_file or '
     "MAILDESK_SMTP_OAUTH2_REFRESH_TOKEN"),
    ('[smtp]\noauth2_token_url = "file:///etc/passwd"\n',
     '[smtp] oauth2_token_url: expected an https:// URL, got "file:///etc/passwd"'),
    ('[smtp]\nauth = "oauth"\n', '[smtp] auth: expected one of "password" or "xoauth2", got '
     '"oauth"'),
])  # fmt: skip
def test_a_missing_or_wrong_oauth2_key_is_named(text: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        parse(text, tmp_path)
    assert str(error.value) == f"config.toml: {message}"


def test_xoauth2_credentials_come_from_files_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "refresh").write_text("rt-from-systemd\n")
    (tmp_path / "client-id").write_text("id-beside-the-config\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    monkeypatch.setenv("MAILDESK_IMAP_OAUTH2_CLIENT_SECRET", "cs-from-env")
    settings = parse(IMAP_ON + URL + 'oauth2_client_id_file = "client-id"\n'
                     'oauth2_refresh_token_file = "%d/refresh"\n', tmp_path)  # fmt: skip
    client = OAuth2Client.from_settings(settings.imap)
    assert settings.imap.password is None  # Not needed with xoauth2.
    assert client == OAuth2Client("https://oauth2.googleapis.com/token", "id-beside-the-config",
                                  SecretStr("rt-from-systemd"), SecretStr("cs-from-env"))
    assert "rt-from-systemd" not in repr(settings) and "cs-from-env" not in repr(settings)


def test_no_token_or_secret_reaches_the_log(
    endpoint: Endpoint, oauth2_dovecot: DovecotServer
) -> None:
    settings = imap_settings(endpoint, oauth2_dovecot)
    assert settings.oauth2_refresh_token is not None
    refresh = settings.oauth2_refresh_token.get_secret_value()
    unknown = settings.model_copy(update={"oauth2_refresh_token": SecretStr("rt-unknown-one")})
    out = io.StringIO()
    configure_logging("debug", json=True, stream=out)
    try:
        fetch(settings)  # a refresh and a login
        endpoint.revoke(endpoint.issued[-1])
        fetch(settings)  # a refused login, a refresh, a login
        with pytest.raises(LoginError, match="answered 400: invalid_grant"):
            fetch(unknown)  # a refused refresh
    finally:
        structlog.reset_defaults()
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert events.count("oauth2.refreshed") == 2
    assert "oauth2.refused" in events and "imap.oauth2_failed" in events
    for secret in (endpoint.client_secret, refresh, "rt-unknown-one", *endpoint.issued):
        assert secret not in out.getvalue()
