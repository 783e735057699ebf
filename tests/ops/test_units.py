"""The systemd units: `systemd-analyze verify` clean, and an exposure of 2.0 or less each."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from maildesk.ops.service import UNIT_FILES, UNIT_PROGRAM

UNITS = Path(__file__).resolve().parents[2] / "systemd"
SERVICES = [name for name in UNIT_FILES if name.endswith(".service")]
MAX_EXPOSURE = 2.0
# The venv's console script: verify wants every ExecStart= program to exist and be executable.
INSTALLED = Path(sys.executable).parent / "maildesk"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def test_the_repository_holds_exactly_the_installed_units() -> None:
    assert sorted(p.name for p in UNITS.iterdir()) == sorted(UNIT_FILES)


@pytest.mark.parametrize("name", UNIT_FILES)
def test_unit_passes_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    # The units name the documented /opt/maildesk venv; this copy names the one at hand.
    for unit in UNIT_FILES:
        text = (UNITS / unit).read_text(encoding="utf-8").replace(UNIT_PROGRAM, str(INSTALLED))
        (tmp_path / unit).write_text(text, encoding="utf-8")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    # The check above can fail: an unknown directive and a missing program are reported.
    text = (UNITS / "maildesk.service").read_text(encoding="utf-8")
    (tmp_path / "maildesk.service").write_text(text.replace("Type=notify", "Tpye=notify"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "maildesk.service")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert "Tpye" in result.stderr
    assert f"{UNIT_PROGRAM} is not executable" in result.stderr


def exposure(path: Path) -> float:
    """The "Overall exposure level" that `systemd-analyze security --offline` gives a unit."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


@pytest.mark.parametrize("name", SERVICES)
def test_service_is_sandboxed_to_an_exposure_of_2_or_less(name: str) -> None:
    assert exposure(UNITS / name) <= MAX_EXPOSURE


def test_the_daemon_is_a_notify_service_with_a_watchdog() -> None:
    text = (UNITS / "maildesk.service").read_text(encoding="utf-8")
    assert re.search(r"^Type=notify$", text, re.M)
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert re.search(r"^LoadCredential=config\.toml:/etc/maildesk/config\.toml$", text, re.M)


def test_the_timer_runs_retention_daily() -> None:
    timer = (UNITS / "maildesk-retention.timer").read_text(encoding="utf-8")
    assert re.search(r"^OnCalendar=daily$", timer, re.M)
    service = (UNITS / "maildesk-retention.service").read_text(encoding="utf-8")
    assert re.search(rf"^ExecStart={re.escape(UNIT_PROGRAM)} retention run$", service, re.M)


def test_an_unhardened_unit_scores_above_the_bound(tmp_path: Path) -> None:
    # The exposure check can fail: the old unit, with a few protections only, scored 7.1.
    unit = tmp_path / "plain.service"
    unit.write_text("[Service]\nExecStart=/bin/true\nNoNewPrivileges=yes\nProtectSystem=strict\n")
    assert exposure(unit) > MAX_EXPOSURE
