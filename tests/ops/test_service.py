"""`maildesk install-service`, run as a process into a temporary root: as far as this machine
goes without a running systemd (the units in place and enabled, the schema upgraded).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from maildesk.ops.service import ENABLED_UNITS, UNIT_FILES
from maildesk.store.database import SCHEMA_HEAD

REPO = Path(__file__).resolve().parents[2]
INSTALLED = Path(sys.executable).parent / "maildesk"
STATE = Path("/var/lib/maildesk")


def install(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maildesk", "install-service", "--root", str(root), *extra],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_fresh_install_puts_config_and_units_in_place(tmp_path: Path) -> None:
    state_existed = STATE.exists()
    root = tmp_path / "root"
    result = install(root)
    assert (result.returncode, result.stderr) == (0, "")
    config = root / "etc/maildesk/config.toml"
    assert config.read_bytes() == (REPO / "config.toml").read_bytes()
    assert config.stat().st_mode & 0o777 == 0o600  # The service gets it as a credential.
    units = root / "etc/systemd/system"
    for name in UNIT_FILES:
        assert (units / name).is_file()
    service = (units / "maildesk.service").read_text(encoding="utf-8")
    assert re.search(rf"^ExecStart={re.escape(str(INSTALLED))} run$", service, re.M)
    assert re.search(rf"^ExecStartPre={re.escape(str(INSTALLED))} db upgrade$", service, re.M)
    assert (units / "multi-user.target.wants/maildesk.service").is_symlink()
    assert (units / "timers.target.wants/maildesk-retention.timer").is_symlink()
    # Nothing outside the root: the sample's database is the target's, left for the service.
    assert STATE.exists() == state_existed
    lines = result.stdout.splitlines()
    assert all(line.startswith(("done: ", "to do: ")) for line in lines), result.stdout
    assert lines[-1].startswith("to do: not started (installed under --root)")
    assert f"systemctl start {' '.join(ENABLED_UNITS)}" in lines[-1]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_installed_units_pass_verify(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert install(root).returncode == 0
    units = [str(root / "etc/systemd/system" / name) for name in UNIT_FILES]
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, "")


def test_an_existing_config_is_kept_and_its_database_upgraded(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = root / "etc/maildesk/config.toml"
    config.parent.mkdir(parents=True)
    text = f'[desk]\nstate_dir = "{tmp_path / "state"}"\n[listener]\nenabled = false\n'
    config.write_text(text, encoding="utf-8")
    first = install(root)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "done: kept the existing /etc/maildesk/config.toml" in first.stdout
    assert f"done: maildesk db upgrade: the database was upgraded from empty to revision " \
           f"{SCHEMA_HEAD}" in first.stdout
    again = install(root)
    assert again.returncode == 0
    assert f"done: maildesk db upgrade: the database is up to date (revision {SCHEMA_HEAD})" \
           in again.stdout
    assert config.read_text(encoding="utf-8") == text
    status = subprocess.run([str(INSTALLED), "--config", str(config), "db", "status"],
                            capture_output=True, text=True)
    assert status.returncode == 0, status.stdout + status.stderr


def test_a_program_the_sandbox_hides_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    result = install(root, "--program", "/home/someone/maildesk/.venv/bin/maildesk")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("maildesk: error: the maildesk command is in /home/someone")
    assert "ProtectHome" in result.stderr
    assert not root.exists()


def test_a_failed_schema_upgrade_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = root / "etc/maildesk/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[store]\nurl = "postgresql+psycopg://nobody@127.0.0.1:1/none"\n')
    result = install(root)
    assert result.returncode == 1
    last = result.stdout.splitlines()[-1]
    assert last.startswith("failed: maildesk db upgrade: maildesk: error: cannot open the database")
    assert not (root / "etc/systemd/system/multi-user.target.wants").exists()
