"""Configuration: typed settings, secrets from files or the environment, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from maildesk.config import ConfigError, Settings, load_settings, parse_settings

REPO = Path(__file__).resolve().parent.parent


def parse(text: str, tmp_path: Path) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path)


def error_of(text: str, tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text, tmp_path)
    return str(caught.value).replace(str(tmp_path / "config.toml"), "config.toml")


def test_the_sample_config_is_valid_and_carries_the_vendor_values() -> None:
    settings = load_settings(REPO / "config.toml")
    assert settings.privacy.controller == "Neocase Software"
    assert "91 boulevard National, 92250 La Garenne-Colombes" in settings.privacy.controller_address
    assert settings.privacy.dpo_email == "dpo@neocasesoftware.com"
    assert settings.privacy.retention_years == 5
    assert settings.privacy.authority == "CNIL"
    assert "Boston" in settings.privacy.us_entity
    assert settings.desk.locale == "fr"


def test_the_sample_config_documents_every_key() -> None:
    text = (REPO / "config.toml").read_text(encoding="utf-8")
    for section, model in Settings.model_fields.items():
        assert f"[{section}]" in text
        for key in model.annotation.model_fields:  # type: ignore[union-attr]
            assert f"\n{key} =" in text or f"\n# {key} =" in text, f"[{section}] {key}"


def test_defaults_are_the_embedded_ones(tmp_path: Path) -> None:
    settings = parse(f'[desk]\nstate_dir = "{tmp_path}"\n', tmp_path)
    assert settings.store_url == f"sqlite:///{tmp_path / 'maildesk.sqlite3'}"
    assert settings.smtp.transport == "maildir"
    assert settings.outgoing_maildir == tmp_path / "outgoing"
    assert settings.listener.host == "127.0.0.1"
    assert not settings.imap.enabled


def test_relative_state_dir_is_taken_from_the_config_directory(tmp_path: Path) -> None:
    settings = parse('[desk]\nstate_dir = "state"\n', tmp_path)
    assert settings.desk.state_dir == tmp_path / "state"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[imap]\nport = "abc"\n', 'config.toml: [imap] port: expected an integer, got "abc"'),
        ("[imap]\nprot = 143\n", "config.toml: [imap] prot: unknown key"),
        ("[imapp]\n", "config.toml: [imapp]: unknown section"),
        ('[desk]\nlocale = "de"\n', "config.toml: [desk] locale: expected one of"),
        ("[listener]\nport = 70000\n", "config.toml: [listener] port: 70000 is out of range"),
        ('[smtp]\ntransport = "carrier-pigeon"\n', "config.toml: [smtp] transport: expected one"),
        ('[imap]\nenabled = "yes"\n', 'config.toml: [imap] enabled: expected true or false'),
        ('[desk]\naddress = "support"\n', "config.toml: [desk] address: "),
        (
            '[imap]\nenabled = true\nusername = "u"\n',
            "config.toml: [imap] password: missing required value",
        ),
        ("[imap]\nenabled = true\npassword = \"p\"\n", "config.toml: [imap] username: missing"),
        ("desk = 3\n", "config.toml: [desk]: expected a table, got 3"),
        ('[tickets]\noffice_opens = "9h"\n',
         'config.toml: [tickets] office_opens: expected a time of day (09:00:00, or "09:00"), '
         'got "9h"'),
        ('[tickets]\noffice_days = ["mon", "lundi"]\n',
         'config.toml: [tickets] office_days.1: expected one of "mon", "tue"'),
        ("[tickets]\noffice_opens = 18:00:00\noffice_closes = 09:00:00\n",
         "config.toml: [tickets]: office_closes (09:00:00) must come after office_opens"),
        ("[desk\n", "config.toml: not valid TOML"),
    ],
)
def test_each_error_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    assert error_of(text, tmp_path).startswith(message)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file"):
        load_settings(tmp_path / "nope.toml")


def test_secrets_come_from_files(tmp_path: Path) -> None:
    (tmp_path / "imap.pw").write_text("s3cret-imap\n", encoding="utf-8")
    settings = parse(
        '[imap]\nenabled = true\nusername = "u"\npassword_file = "imap.pw"\n', tmp_path
    )
    assert settings.imap.password is not None
    assert settings.imap.password.get_secret_value() == "s3cret-imap"
    assert "s3cret" not in repr(settings)


def test_secrets_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILDESK_SMTP_PASSWORD", "from-env")
    monkeypatch.setenv("MAILDESK_REPLY_KEY", "key-from-env")
    settings = parse("", tmp_path)
    assert settings.smtp.password is not None
    assert settings.smtp.password.get_secret_value() == "from-env"
    assert settings.security.reply_key is not None
    assert settings.security.reply_key.get_secret_value() == "key-from-env"


def test_a_secret_given_twice_is_refused(tmp_path: Path) -> None:
    message = error_of('[smtp]\npassword = "a"\npassword_file = "b"\n', tmp_path)
    assert message == "config.toml: [smtp] password: set password or password_file, not both"


def test_an_unreadable_secret_file_is_named(tmp_path: Path) -> None:
    message = error_of('[security]\nreply_key_file = "missing.key"\n', tmp_path)
    assert message.startswith("config.toml: [security] reply_key_file: cannot read")


def test_parse_settings_does_not_change_the_defaults() -> None:
    first = parse_settings({}, "x", Path("/"))
    assert first == Settings()


def test_log_format_is_json_console_or_unset(tmp_path: Path) -> None:
    assert parse('[log]\nformat = "console"\n', tmp_path).log.format == "console"
    assert parse('[log]\nformat = "json"\n', tmp_path).log.format == "json"
    assert parse("[log]\n", tmp_path).log.format is None
    assert error_of('[log]\nformat = "xml"\n', tmp_path) == (
        'config.toml: [log] format: expected one of "json" or "console", got "xml"'
    )


def test_a_secret_file_under_percent_d_comes_from_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "smtp-password").write_text("from-systemd\n")
    (tmp_path / "smtp-password").write_text("beside-the-config\n")
    text = '[smtp]\nusername = "desk"\npassword_file = "%d/smtp-password"\n'
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert parse(text, tmp_path).smtp.password.get_secret_value() == "from-systemd"  # type: ignore[union-attr]
    # Run by hand, without systemd's variable: the config file's directory.
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert parse(text, tmp_path).smtp.password.get_secret_value() == "beside-the-config"  # type: ignore[union-attr]


def test_a_missing_credential_names_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "none"))
    message = error_of('[security]\nreply_key_file = "%d/reply-key"\n', tmp_path)
    assert message == (
        f"config.toml: [security] reply_key_file: cannot read {tmp_path / 'none' / 'reply-key'}: "
        "No such file or directory"
    )
