"""The `maildesk` command, run as a process the way operators run it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support_fixtures import Desk, base_config, make_desk

from maildesk.cli.main import main


def test_a_bad_value_gives_one_message_naming_the_key_and_exit_2(tmp_path: Path) -> None:
    desk = Desk(tmp_path, tmp_path / "config.toml")
    desk.write_config('[imap]\nport = "abc"\n')
    result = desk.cli("run")
    assert result.code == 2
    assert result.err.strip() == f'{desk.config}: [imap] port: expected an integer, got "abc"'
    assert result.out == ""


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    desk = Desk(tmp_path, tmp_path / "absent.toml")
    result = desk.cli("companies", "list")
    assert result.code == 2
    assert "absent.toml: no such file" in result.err


def test_the_config_path_comes_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "elsewhere.toml"
    config.write_text("[desk]\nname = 1\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "maildesk", "db", "status"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "MAILDESK_CONFIG": str(config)},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{config}: [desk] name: expected a string, got 1"


def test_commands_refuse_an_out_of_date_schema(tmp_path: Path) -> None:
    desk = Desk(tmp_path, tmp_path / "config.toml")
    desk.write_config(base_config(tmp_path / "state", f"sqlite:///{tmp_path}/db.sqlite3"))
    hint = f"run `maildesk --config {desk.config} db upgrade` first"
    for command in (["run"], ["companies", "list"]):
        result = desk.cli(*command)
        assert result.code == 1
        assert hint in result.err
        # Nothing was created: the hint is the whole of what happened.
        assert not (tmp_path / "db.sqlite3").exists()
    assert desk.cli("db", "upgrade").code == 0
    assert desk.cli("db", "status").code == 0


@pytest.mark.parametrize(
    "command",
    [
        [], ["run"], ["quickstart"], ["db", "upgrade"], ["db", "status"],
        ["companies", "add"], ["companies", "update"], ["companies", "list"],
        ["accounts", "add"], ["accounts", "import"], ["accounts", "update"],
        ["accounts", "deactivate"], ["accounts", "list"], ["accounts", "show"],
        ["agents", "add"], ["agents", "list"], ["agents", "deactivate"],
        ["tickets", "list"], ["tickets", "show"], ["quarantine", "list"], ["quarantine", "show"],
        ["quarantine", "release"],
    ],
)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    assert "usage: maildesk" in capsys.readouterr().out


def test_companies(desk: Desk) -> None:
    assert desk.cli("companies", "add", "ACME SA", "--after-hours").code == 0
    assert desk.cli("companies", "add", "Globex").code == 0
    again = desk.cli("companies", "add", "acme sa")
    assert again.code == 1
    assert 'company "acme sa" already exists' in again.err
    assert desk.cli("companies", "update", "Globex", "--after-hours", "--inactive").code == 0
    assert desk.cli("companies", "update", "ACME SA", "--no-after-hours").code == 0
    listed = json.loads(desk.cli("companies", "list", "--json").out)
    assert listed == [
        {"name": "ACME SA", "after_hours": False, "active": True},
        {"name": "Globex", "after_hours": True, "active": False},
    ]
    assert desk.cli("companies", "list").out.splitlines() == [
        "NAME     AFTER_HOURS  ACTIVE",
        "ACME SA  False        True",
        "Globex   True         False",
    ]
    missing = desk.cli("companies", "update", "Initech", "--inactive")
    assert (missing.code, missing.err.strip()) == (1, 'maildesk: error: no company named "Initech"')


def test_accounts(desk: Desk) -> None:
    assert desk.cli("companies", "add", "ACME SA").code == 0
    added = desk.cli(
        "accounts", "add", "--email", "Claire.Dupont@Client.example", "--name", "Claire Dupont",
        "--company", "acme sa", "--phone", "+33 1 23 45 67 89", "--locale", "en",
    )
    assert added.code == 0, added.err
    duplicate = desk.cli(
        "accounts", "add", "--email", "claire.dupont@client.EXAMPLE", "--name", "C",
        "--company", "ACME SA",
    )
    assert duplicate.code == 1
    assert "already exists" in duplicate.err
    invalid = desk.cli(
        "accounts", "add", "--email", "claire", "--name", "C", "--company", "ACME SA"
    )
    assert invalid.code == 1
    assert '"claire" is not a valid email address' in invalid.err
    unknown = desk.cli("accounts", "add", "--email", "x@client.example", "--name", "X",
                       "--company", "Nope")
    assert (unknown.code, 'no company named "Nope"' in unknown.err) == (1, True)

    assert desk.cli("accounts", "update", "claire.dupont@client.example", "--name", "Claire Martin",
                    "--email", "claire.martin@client.example", "--phone", "").code == 0
    shown = json.loads(desk.cli("accounts", "show", "CLAIRE.MARTIN@client.example", "--json").out)
    assert shown["name"] == "Claire Martin"
    assert shown["email"] == "claire.martin@client.example"
    assert shown["phone"] is None
    assert shown["locale"] == "en"
    assert shown["active"] is True

    deactivated = desk.cli("accounts", "deactivate", "claire.martin@client.example",
                           "--on", "2026-01-15")
    assert deactivated.code == 0
    shown = json.loads(desk.cli("accounts", "show", "claire.martin@client.example", "--json").out)
    # The date is the desk's (Europe/Paris): 15 January begins at 23:00 UTC on the 14th.
    assert shown["deactivated_at"] == "2026-01-14T23:00:00+00:00"
    assert shown["active"] is False
    bad_date = desk.cli("accounts", "deactivate", "claire.martin@client.example", "--on", "soon")
    assert bad_date.code == 2
    assert "expected a date like 2026-12-31" in bad_date.err
    absent = desk.cli("accounts", "show", "nobody@client.example")
    assert (absent.code, absent.err.strip()) == (
        1, "maildesk: error: no account with email nobody@client.example"
    )


def test_agents(desk: Desk) -> None:
    assert desk.cli("agents", "add", "--email", "alice@vendor.example", "--name", "Alice Martin",
                    "--region", "eu").code == 0
    assert desk.cli("agents", "add", "--email", "bob@vendor.example", "--name", "Bob Smith",
                    "--region", "us").code == 0
    wrong = desk.cli("agents", "add", "--email", "c@vendor.example", "--name", "C",
                     "--region", "asia")
    assert wrong.code == 2
    assert desk.cli("agents", "deactivate", "bob@vendor.example").code == 0
    listed = json.loads(desk.cli("agents", "list", "--json").out)
    assert listed == [
        {"email": "alice@vendor.example", "name": "Alice Martin", "region": "eu", "active": True},
        {"email": "bob@vendor.example", "name": "Bob Smith", "region": "us", "active": False},
    ]
    table = desk.cli("agents", "list").out
    assert table.splitlines()[0].split() == ["EMAIL", "NAME", "REGION", "ACTIVE"]


GOOD_CSV = """\
email,name,company,phone,locale
claire.dupont@client.example,Claire Dupont,ACME SA,+33 1 23 45 67 89,fr
john.smith@client.example,John Smith,ACME SA,,en
zoe@globex.example,Zoé Lefèvre,Globex,,
"""


def _accounts(desk: Desk) -> list[dict[str, object]]:
    result = desk.cli("accounts", "list", "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_import_then_reimport_changes_nothing(desk: Desk) -> None:
    desk.cli("companies", "add", "ACME SA")
    desk.cli("companies", "add", "Globex")
    (desk.directory / "people.csv").write_text(GOOD_CSV, encoding="utf-8")
    first = desk.cli("accounts", "import", "people.csv")
    assert first.code == 0, first.err
    assert "3 accounts created, 0 already present" in first.out
    before = _accounts(desk)
    assert [a["email"] for a in before] == [
        "claire.dupont@client.example", "john.smith@client.example", "zoe@globex.example",
    ]
    assert before[2]["name"] == "Zoé Lefèvre"
    assert before[2]["locale"] == "fr"
    second = desk.cli("accounts", "import", "people.csv")
    assert second.code == 0
    assert "0 accounts created, 3 already present" in second.out
    assert _accounts(desk) == before


BAD_ROWS = [
    (",Nobody,ACME SA,,fr", "line 4: email is missing (it is mandatory)"),
    ("not-an-address,X,ACME SA,,fr", 'line 4: "not-an-address" is not a valid email address'),
    ("x@client.example,X,Initech,,fr", 'line 4: no company named "Initech"'),
    ("John.Smith@client.example,J,ACME SA,,en", "line 4: john.smith@client.example is a "
     "duplicate of line 3"),
    ("x@client.example,X,ACME SA,,de", 'line 4: locale must be one of fr, en, not "de"'),
    ("x@client.example,,ACME SA,,fr", "line 4: name is missing"),
    ("x@client.example,X,ACME SA,,fr,extra", "line 4: more fields than the header has"),
]


def test_one_bad_row_rejects_the_whole_file(desk: Desk) -> None:
    desk.cli("companies", "add", "ACME SA")
    for row, reason in BAD_ROWS:
        lines = [*GOOD_CSV.splitlines()[:3], row]
        (desk.directory / "bad.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        result = desk.cli("accounts", "import", "bad.csv")
        assert (result.code, result.err.strip()) == (1, f"maildesk: error: bad.csv: {reason}")
    assert _accounts(desk) == []


# A customer company's CSV, with controls in its cells: an OSC that retitles the terminal, a
# NUL, an erase-screen CSI, and bidi isolates.
HOSTILE_CSV = (
    "email,name,company,phone,locale\n"
    'zoe@globex.example,"Zoé\x1b]0;root@desk\x07 Lefèvre",Globex,,\n'
    'marc@globex.example,"Marc\x00 \u2066Petit\u2069",Globex,"+33\x1b[2J 1 23",en\n'
)


def test_names_from_a_csv_are_stored_clean_and_other_cells_escaped(desk: Desk) -> None:
    assert desk.cli("companies", "add", "Globex").code == 0
    (desk.directory / "people.csv").write_text(HOSTILE_CSV, encoding="utf-8")
    assert desk.cli("accounts", "import", "people.csv").code == 0
    listed = desk.cli("accounts", "list")
    assert listed.out.splitlines() == [
        "EMAIL                NAME                     COMPANY  LOCALE  ACTIVE",
        "marc@globex.example  Marc Petit               Globex   en      True",
        "zoe@globex.example   Zoé]0;root@desk Lefèvre  Globex   fr      True",
    ]
    shown = desk.cli("accounts", "show", "marc@globex.example").out.splitlines()
    assert shown[1:4] == [
        "name:           Marc Petit",
        "company:        Globex",
        "phone:          +33\\x1b[2J 1 23",
    ]
    as_json = desk.cli("accounts", "list", "--json").out
    assert not {"\x1b", "\x00", "\x07", "\u2066"} & set(as_json)
    assert json.loads(as_json)[0]["name"] == "Marc Petit"


def test_an_error_quoting_a_csv_cell_is_escaped(desk: Desk) -> None:
    (desk.directory / "bad.csv").write_text(
        "email,name,company\nzoe@globex.example,Zoé,Init\x1b[2Jech\u202e\n", encoding="utf-8"
    )
    result = desk.cli("accounts", "import", "bad.csv")
    assert (result.code, result.err) == (
        1, 'maildesk: error: bad.csv: line 2: no company named "Init\\x1b[2Jech\\u202e"\n'
    )


def test_the_cli_works_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    desk = make_desk(tmp_path, postgres_url)
    (desk.directory / "people.csv").write_text(GOOD_CSV, encoding="utf-8")
    assert desk.cli("companies", "add", "ACME SA").code == 0
    assert desk.cli("companies", "add", "Globex").code == 0
    assert desk.cli("accounts", "import", "people.csv").code == 0
    again = desk.cli("accounts", "import", "people.csv")
    assert "0 accounts created, 3 already present" in again.out
    assert len(_accounts(desk)) == 3


def test_a_csv_without_the_right_header_is_refused(desk: Desk) -> None:
    (desk.directory / "h.csv").write_text("mail,nom\nx@y.example,X\n", encoding="utf-8")
    result = desk.cli("accounts", "import", "h.csv")
    assert result.code == 1
    assert "h.csv: line 1: the header must name the columns email, name, company" in result.err


def test_run_starts_and_stops_on_sigterm(desk: Desk) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "maildesk", "--config", str(desk.config), "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    started = json.loads(proc.stdout.readline())
    assert started["event"] == "started"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["event"] == "stopped"
