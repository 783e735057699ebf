"""Configuration: read `config.toml` with tomllib and validate it into typed settings.

Every problem is reported as one `ConfigError` whose message names the file, the section and the
key, for example `config.toml: [imap] port: expected an integer, got "abc"`, so that an operator
can fix it without reading a traceback.
"""

from __future__ import annotations

import os
import tomllib
from datetime import date, time
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG_PATH = "config.toml"
CONFIG_ENV_VAR = "MAILDESK_CONFIG"
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
# A secret file's path may start with this, for systemd's credentials directory.
CREDENTIALS_PLACEHOLDER = "%d"

# Secrets may also come from the environment, so that systemd credentials or a container
# orchestrator can hand them over without writing them into the config file.
SECRET_ENV_VARS = {
    ("imap", "password"): "MAILDESK_IMAP_PASSWORD",
    ("smtp", "password"): "MAILDESK_SMTP_PASSWORD",
    ("security", "reply_key"): "MAILDESK_REPLY_KEY",
    # XOAUTH2's credentials are read the same ways (the client id is no secret, but is handed
    # over with the others).
    ("imap", "oauth2_client_id"): "MAILDESK_IMAP_OAUTH2_CLIENT_ID",
    ("imap", "oauth2_client_secret"): "MAILDESK_IMAP_OAUTH2_CLIENT_SECRET",
    ("imap", "oauth2_refresh_token"): "MAILDESK_IMAP_OAUTH2_REFRESH_TOKEN",
    ("smtp", "oauth2_client_id"): "MAILDESK_SMTP_OAUTH2_CLIENT_ID",
    ("smtp", "oauth2_client_secret"): "MAILDESK_SMTP_OAUTH2_CLIENT_SECRET",
    ("smtp", "oauth2_refresh_token"): "MAILDESK_SMTP_OAUTH2_REFRESH_TOKEN",
}


class ConfigError(Exception):
    """A configuration problem, with a message fit to show the operator as it is."""


class _Section(BaseModel):
    # Strict mode: TOML already has typed values, so "143" for a port is a mistake to report,
    # not a string to coerce. Unknown keys are typos to report, not to ignore.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


Port = Annotated[int, Field(ge=1, le=65535)]
TlsMode = Literal["ssl", "starttls", "none"]
# Paths are strings in TOML; strict mode would refuse to turn them into Path objects.
FilePath = Annotated[Path, Field(strict=False)]


class DeskSettings(_Section):
    """[desk]: who the desk is."""

    name: str = "Support"
    address: str = "support@maildesk.localhost"
    locale: Literal["fr", "en"] = "fr"
    state_dir: FilePath = Path("/var/lib/maildesk")
    # This instance's name in queue claims and leases, stable across its restarts (it takes its
    # own unfinished claims back at once). Default: the host name and the state directory; set
    # it when several instances run on one host with a shared state directory.
    instance: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,80}$")] | None = None
    # The time zone of the desk's dates, such as an account's deactivation date.
    timezone: str = "Europe/Paris"

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f'unknown time zone "{value}" (expected one like Europe/Paris)'
            ) from None
        return value

    @field_validator("address")
    @classmethod
    def _address_has_domain(cls, value: str) -> str:
        local, _, domain = value.rpartition("@")
        if not local or not domain or " " in value:
            raise ValueError(f'expected an email address, got "{value}"')
        return value.lower()

    @property
    def domain(self) -> str:
        """The domain of the support address, used for Message-IDs and reply addresses."""
        return self.address.rpartition("@")[2]


class StoreSettings(_Section):
    """[store]: where the data live."""

    url: str | None = None


class _LoginSettings(_Section):
    """The login keys that [imap] and [smtp] share: a password, or XOAUTH2's credentials."""

    # "xoauth2" logs in with an OAuth 2.0 access token (Gmail, Microsoft 365), which maildesk
    # gets from oauth2_token_url with the refresh token; the password is then not used.
    auth: Literal["password", "xoauth2"] = "password"
    oauth2_token_url: str | None = None
    oauth2_client_id: str | None = None
    oauth2_client_id_file: FilePath | None = None
    # A public client (one registered without a secret, as Microsoft allows) has none.
    oauth2_client_secret: SecretStr | None = None
    oauth2_client_secret_file: FilePath | None = None
    oauth2_refresh_token: SecretStr | None = None
    oauth2_refresh_token_file: FilePath | None = None
    # Sent with each refresh when set: Microsoft's endpoint wants the scopes named again.
    oauth2_scope: str | None = None

    @field_validator("oauth2_token_url")
    @classmethod
    def _web_address(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError(f'expected an https:// URL, got "{value}"')
        return value

    def _xoauth2_missing(self, section: str) -> _KeyProblem | None:
        """The first XOAUTH2 key that auth = "xoauth2" needs and lacks, as a problem."""
        if self.auth != "xoauth2":
            return None
        if self.oauth2_token_url is None:
            return _KeyProblem(
                (section, "oauth2_token_url"),
                'missing required value (auth = "xoauth2"): the token endpoint, such as '
                "https://oauth2.googleapis.com/token",
            )
        for key, value in (
            ("oauth2_client_id", self.oauth2_client_id),
            ("oauth2_refresh_token", self.oauth2_refresh_token),
        ):
            if value is None:
                env_var = SECRET_ENV_VARS[(section, key)]
                return _KeyProblem(
                    (section, key),
                    f'missing required value (auth = "xoauth2"): set {key}, {key}_file '
                    f"or {env_var}",
                )
        return None


class ImapSettings(_LoginSettings):
    """[imap]: the mailbox that maildesk reads."""

    enabled: bool = False
    host: str = "localhost"
    port: Port = 993
    tls: TlsMode = "ssl"
    username: str | None = None
    password: SecretStr | None = None
    password_file: FilePath | None = None
    folder: str = "INBOX"
    processed_folder: str = "maildesk/processed"
    quarantine_folder: str = "maildesk/quarantine"
    poll_seconds: Annotated[int, Field(ge=1)] = 60
    idle: bool = True


class ListenerSettings(_Section):
    """[listener]: the built-in SMTP or LMTP listener."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 2525
    protocol: Literal["smtp", "lmtp"] = "smtp"
    # Bounds on what clients may make the listener hold, so that no peer can exhaust it.
    max_sessions: Annotated[int, Field(ge=1)] = 50
    max_recipients: Annotated[int, Field(ge=1)] = 50
    max_bytes_in_flight: Annotated[int, Field(ge=1024)] = 200 * 1024 * 1024
    idle_timeout_seconds: Annotated[int, Field(ge=1)] = 300
    data_timeout_seconds: Annotated[int, Field(ge=1)] = 600


class SmtpSettings(_LoginSettings):
    """[smtp]: how outgoing mail leaves."""

    transport: Literal["smtp", "maildir"] = "maildir"
    host: str = "localhost"
    port: Port = 25
    tls: TlsMode = "none"
    username: str | None = None
    password: SecretStr | None = None
    password_file: FilePath | None = None
    maildir: FilePath | None = None
    # A mail that could not be delivered for this long is given up on (and its ticket says so);
    # until then every temporary failure is retried, whatever their number.
    give_up_days: Annotated[float, Field(gt=0, strict=False)] = 5.0
    # The first retry's wait after a temporary failure, doubling up to retry_most_seconds.
    retry_first_seconds: Annotated[float, Field(gt=0, strict=False)] = 60.0
    retry_most_seconds: Annotated[float, Field(gt=0, strict=False)] = 3600.0

    @model_validator(mode="after")
    def _xoauth2_needs_credentials(self) -> SmtpSettings:
        if self.transport != "smtp" or self.auth != "xoauth2":
            return self
        if not self.username:
            raise _KeyProblem(("smtp", "username"), 'missing required value (auth = "xoauth2")')
        problem = self._xoauth2_missing("smtp")
        if problem is not None:
            raise problem
        return self


class PrivacySettings(_Section):
    """[privacy]: the values quoted in every privacy-notice footer."""

    controller: str = "Neocase Software"
    controller_address: str = "91 boulevard National, 92250 La Garenne-Colombes, France"
    dpo_email: str = "dpo@neocasesoftware.com"
    notice_url: str = ""
    retention_years: Annotated[int, Field(ge=1, le=100)] = 5
    # Mail from strangers (no account), held on no ticket, is erased after this many days.
    quarantine_days: Annotated[int, Field(ge=1, le=3650)] = 30
    # Audit events are kept this many days (the CNIL recommends a year for such logs).
    audit_days: Annotated[int, Field(ge=1, le=36500)] = 365
    authority: str = "CNIL"
    authority_url: str = "https://www.cnil.fr/fr/plaintes"
    us_entity: str = "Neocase Software Inc., near Boston, United States"
    # The full notice and the record of processing (`maildesk privacy register`) name these.
    # The technical providers (processors) that host or carry the data, one entry each.
    processors: Annotated[tuple[str, ...], Field(strict=False)] = ()
    # Security measures beyond those maildesk itself takes, for the record of processing.
    security_measures: Annotated[tuple[str, ...], Field(strict=False)] = ()


class ReplyKeySettings(_Section):
    """One entry of [security] reply_keys: a key that signs or still verifies reply addresses."""

    id: Annotated[str, Field(pattern=r"^[a-z0-9]{1,8}$")]
    key: SecretStr
    # Retired keys (every entry after the first) are accepted until this day, included.
    accept_until: date | None = None


class SecuritySettings(_Section):
    """[security]: keys and trust anchors."""

    reply_key: SecretStr | None = None
    reply_key_file: FilePath | None = None
    # Key rotation: the first entry signs new reply addresses; the others still verify replies
    # until their accept_until date. Each entry has `key` or `key_file`.
    reply_keys: Annotated[tuple[ReplyKeySettings, ...], Field(strict=False)] = ()
    trusted_authserv_id: str | None = None

    @model_validator(mode="after")
    def _one_way_to_give_keys(self) -> SecuritySettings:
        if self.reply_keys and self.reply_key is not None:
            raise _KeyProblem(("security", "reply_keys"), "set reply_key or reply_keys, not both")
        for index, entry in enumerate(self.reply_keys[1:], start=1):
            if entry.accept_until is None:
                raise _KeyProblem(
                    ("security", f"reply_keys[{index}]"),
                    "a retired key needs accept_until (the last day its replies count)",
                )
        ids = [entry.id for entry in self.reply_keys]
        if len(set(ids)) != len(ids):
            raise _KeyProblem(("security", "reply_keys"), "two keys have the same id")
        return self


class LimitsSettings(_Section):
    """[limits]: bounds on every mail's size and shape, and on automatic mail."""

    # The largest mail taken in (IMAP checks RFC822.SIZE first; the listener announces SIZE).
    max_mail_bytes: Annotated[int, Field(ge=1024)] = 25 * 1024 * 1024
    max_parts: Annotated[int, Field(ge=1)] = 500
    max_depth: Annotated[int, Field(ge=1)] = 20
    max_header_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024
    # CPU seconds that parsing one mail may take before it is stopped and the mail quarantined.
    parse_seconds: Annotated[float, Field(gt=0, strict=False)] = 10.0
    # Automatic mails (acknowledgements, notices, answers to strangers) to one mailbox a day.
    automatic_per_mailbox_per_day: Annotated[int, Field(ge=1)] = 20
    # A sender who opens more than breaker_tickets tickets in breaker_minutes gets no more
    # automatic mail until the window passes: a loop with an auto-responder ends there.
    breaker_tickets: Annotated[int, Field(ge=1)] = 10
    breaker_minutes: Annotated[int, Field(ge=1)] = 10
    # Answers to strangers, all addresses together, per hour.
    stranger_answers_per_hour: Annotated[int, Field(ge=0)] = 30


class TicketsSettings(_Section):
    """[tickets]: the ticket's clock, in days counted from its last change of status."""

    # A customer's reply to a solved or closed ticket reopens it up to this many days after;
    # later, it opens a new ticket that names the old one.
    reopen_days: Annotated[int, Field(ge=0)] = 14
    # A ticket pending (waiting for the customer) with no answer closes itself after this many
    # days, with a short notice to the customer; a solved one after solved_close_days.
    pending_close_days: Annotated[int, Field(ge=1)] = 7
    solved_close_days: Annotated[int, Field(ge=1)] = 3
    # Which tickets US agents hear of, within the US rule (a company without after-hours support
    # never reaches them): "always", or "outside_office_hours" for only the tickets that arrive
    # when the EU desk is closed: before office_opens, from office_closes on, or on a day not in
    # office_days, in the desk's time zone. A US agent who is assigned or watches a ticket
    # hears of it either way.
    us_agents: Literal["always", "outside_office_hours"] = "always"
    office_opens: time = time(9, 0)
    office_closes: time = time(18, 0)
    office_days: list[Weekday] = Field(
        default_factory=lambda: ["mon", "tue", "wed", "thu", "fri"]  # type: ignore[arg-type]
    )

    @model_validator(mode="after")
    def _office_hours_in_order(self) -> TicketsSettings:
        if self.office_opens >= self.office_closes:
            raise ValueError(
                f"office_closes ({self.office_closes}) must come after office_opens "
                f"({self.office_opens})"
            )
        return self


class LogSettings(_Section):
    """[log]: how much to say."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    # Unset: the console renderer on a terminal, JSON lines otherwise (journald, a pipe, a file).
    format: Literal["json", "console"] | None = None


class MetricsSettings(_Section):
    """[metrics]: the Prometheus text endpoint, off unless `listen` names an address."""

    listen: Annotated[str, Field(pattern=r"^(\[[0-9a-fA-F:]+\]|[^:\s]*):[0-9]{1,5}$")] | None = None


class Settings(_Section):
    """All of maildesk's settings."""

    desk: DeskSettings = DeskSettings()
    store: StoreSettings = StoreSettings()
    imap: ImapSettings = ImapSettings()
    listener: ListenerSettings = ListenerSettings()
    smtp: SmtpSettings = SmtpSettings()
    privacy: PrivacySettings = PrivacySettings()
    security: SecuritySettings = SecuritySettings()
    limits: LimitsSettings = LimitsSettings()
    tickets: TicketsSettings = TicketsSettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()

    @model_validator(mode="after")
    def _imap_needs_credentials(self) -> Settings:
        if self.imap.enabled and not self.imap.username:
            raise _KeyProblem(("imap", "username"), "missing required value (imap is enabled)")
        if not self.imap.enabled:
            return self
        if self.imap.auth == "password" and self.imap.password is None:
            raise _KeyProblem(
                ("imap", "password"),
                "missing required value (imap is enabled): set password, password_file "
                "or MAILDESK_IMAP_PASSWORD",
            )
        problem = self.imap._xoauth2_missing("imap")
        if problem is not None:
            raise problem
        return self

    @property
    def store_url(self) -> str:
        """The database URL: [store] url, else a SQLite file under the state directory."""
        return self.store.url or f"sqlite:///{self.desk.state_dir / 'maildesk.sqlite3'}"

    @property
    def outgoing_maildir(self) -> Path:
        """The maildir that the maildir transport writes to."""
        return self.smtp.maildir or self.desk.state_dir / "outgoing"


class _KeyProblem(ValueError):
    """Raised inside validation to blame one key precisely."""

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


_TYPE_WORDS = {
    "int_type": "an integer",
    "string_type": "a string",
    "bool_type": "true or false",
    "float_type": "a number",
    "dict_type": "a table",
    "model_type": "a table",
    "list_type": "a list",
    "path_type": "a path (a string)",
    "time_type": "a time of day (09:00:00, or \"09:00\")",
    "time_parsing": "a time of day (09:00:00, or \"09:00\")",
}


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _where(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if len(parts) == 1:
        return f"[{parts[0]}]" if parts[0] in Settings.model_fields else parts[0]
    return f"[{parts[0]}] {'.'.join(parts[1:])}"


def _explain(error: Any) -> str:
    """Turn one pydantic error into `[section] key: what is wrong`."""
    kind = error["type"]
    loc = tuple(error["loc"])
    value = error.get("input")
    if kind == "extra_forbidden":
        return f"[{loc[0]}]: unknown section" if len(loc) == 1 else f"{_where(loc)}: unknown key"
    if kind == "missing":
        return f"{_where(loc)}: missing required value"
    if kind in _TYPE_WORDS:
        return f"{_where(loc)}: expected {_TYPE_WORDS[kind]}, got {_describe(value)}"
    if kind == "literal_error":
        expected = str(error.get("ctx", {}).get("expected", "")).replace("'", '"')
        return f"{_where(loc)}: expected one of {expected}, got {_describe(value)}"
    if kind in {"greater_than_equal", "less_than_equal", "greater_than", "less_than"}:
        return f"{_where(loc)}: {_describe(value)} is out of range ({error['msg'].lower()})"
    if kind == "value_error":
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, _KeyProblem):
            return f"{_where(cause.loc)}: {cause.message}"
        return f"{_where(loc)}: {cause}"
    return f"{_where(loc)}: {error['msg']}"


def _secret_path(path: Path, base: Path) -> Path:
    """A secret file's path, with a leading `%d` for the credentials directory.

    `%d` is systemd's name for $CREDENTIALS_DIRECTORY, where LoadCredential= puts the secrets of
    a service. A command run by hand has none, and `%d` is then the config file's directory,
    where the credentials' source files are kept (`/etc/maildesk/imap-password`, say).
    """
    if path.parts and path.parts[0] == CREDENTIALS_PLACEHOLDER:
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        return Path(credentials or base).joinpath(*path.parts[1:])
    return path if path.is_absolute() else base / path


def _read_secret_file(path: Path, where: str, base: Path) -> str:
    full = _secret_path(path, base)
    try:
        return full.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {full}: {exc.strerror}") from exc


def _resolve_secrets(data: dict[str, Any], source: str, base: Path) -> None:
    """Fill each secret from its `*_file` or environment variable, in place."""
    for (section, key), env_var in SECRET_ENV_VARS.items():
        table = data.get(section)
        if table is not None and not isinstance(table, dict):
            continue  # Reported by validation as "expected a table".
        table = table if table is not None else {}
        file_key = f"{key}_file"
        if key in table and file_key in table:
            raise ConfigError(f"{source}: [{section}] {key}: set {key} or {file_key}, not both")
        if file_key in table and isinstance(table[file_key], str):
            table[key] = _read_secret_file(
                Path(table[file_key]), f"{source}: [{section}] {file_key}", base
            )
        elif key not in table and os.environ.get(env_var):
            table[key] = os.environ[env_var]
        if table:
            data[section] = table
    _resolve_reply_key_files(data, source, base)


def _resolve_reply_key_files(data: dict[str, Any], source: str, base: Path) -> None:
    """Read each [security] reply_keys entry's key_file into its key, in place."""
    security = data.get("security")
    entries = security.get("reply_keys") if isinstance(security, dict) else None
    if not isinstance(entries, list):
        return
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "key_file" not in entry:
            continue
        where = f"{source}: [security] reply_keys[{index}]"
        if "key" in entry:
            raise ConfigError(f"{where}: set key or key_file, not both")
        path = entry.pop("key_file")
        if not isinstance(path, str):
            raise ConfigError(f"{where}.key_file: expected a path (a string)")
        entry["key"] = _read_secret_file(Path(path), f"{where}.key_file", base)


def parse_settings(data: dict[str, Any], source: str, base: Path) -> Settings:
    """Validate a decoded TOML document; `source` names it in messages."""
    _resolve_secrets(data, source, base)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ConfigError(f"{source}: {_explain(first)}") from None
    # Relative paths are taken from the config file's directory, as systemd units and
    # operators expect, rather than from wherever the daemon happened to be started.
    desk = settings.desk
    if not desk.state_dir.is_absolute():
        desk = desk.model_copy(update={"state_dir": (base / desk.state_dir).resolve()})
        settings = settings.model_copy(update={"desk": desk})
    return settings


def config_path(explicit: str | None) -> Path:
    """The config file to read: --config, else $MAILDESK_CONFIG, else ./config.toml."""
    return Path(explicit or os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


def load_settings(path: Path) -> Settings:
    """Read and validate the config file at `path`."""
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{source}: no such file (give --config PATH or set {CONFIG_ENV_VAR}; "
            "the repository's config.toml is a documented sample)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return parse_settings(data, source, path.parent.resolve())
