"""Installing maildesk as a systemd service: the config directory, the units, the schema.

`maildesk install-service` runs these steps as root on the machine itself, or into another root
directory (`--root`, for an image or a test), where nothing outside it is touched and nothing is
started. The service runs as a user that systemd makes up (DynamicUser=), so no account is
created; the config reaches it as a credential, so /etc/maildesk stays root's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent

UNIT_FILES = ("maildesk.service", "maildesk-retention.service", "maildesk-retention.timer")
ENABLED_UNITS = ("maildesk.service", "maildesk-retention.timer")
# The program the repository's units name; the installed units name the real console script.
UNIT_PROGRAM = "/opt/maildesk/bin/maildesk"
CONFIG_DIR = Path("etc/maildesk")
UNIT_DIR = Path("etc/systemd/system")
# The unit's ProtectHome= and PrivateTmp= hide these from the service: a maildesk installed
# there would not start.
HIDDEN_FROM_SERVICE = (
    Path("/home"), Path("/root"), Path("/run/user"),
    Path("/tmp"), Path("/var/tmp"),  # noqa: S108 (names to refuse, not temporary files)
)  # fmt: skip

class ServiceError(Exception):
    """The service cannot be installed as asked; the message says why in one line."""


@dataclass(frozen=True)
class Step:
    """One step of the installation, as it went: "done", "to do" (with how) or "failed"."""

    state: str
    text: str


def _run(command: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, check=False)


def _source(name: str) -> Path:
    """A file shipped with maildesk: from the checkout when run from one, else the package."""
    checkout = _PACKAGE_DIR.parent
    # pyproject.toml beside it tells a checkout from site-packages (as for the templates).
    if (checkout / "pyproject.toml").is_file() and (checkout / name).exists():
        return checkout / name
    packaged = {"config.toml": "config.sample.toml"}.get(name, name)
    path = _PACKAGE_DIR / packaged
    if not path.exists():
        raise ServiceError(f"{name} is missing from this installation (looked in {path})")
    return path


def console_script() -> Path:
    """The installed `maildesk` command: the one beside this Python (a venv's), else on PATH."""
    beside = Path(sys.executable).parent / "maildesk"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside.absolute()
    found = shutil.which("maildesk")
    if found is None:
        raise ServiceError("no installed `maildesk` command found beside "
                           f"{sys.executable} or on PATH; install maildesk with pip first")
    return Path(found).absolute()


def check_reachable(program: Path, package_dir: Path = _PACKAGE_DIR) -> None:
    """Refuse a program or package that the service's sandbox would hide."""
    for what, path in (("the maildesk command", program), ("the maildesk package", package_dir)):
        for hidden in HIDDEN_FROM_SERVICE:
            if path.is_relative_to(hidden):
                raise ServiceError(
                    f"{what} is in {path}, which the service cannot see (ProtectHome=, "
                    "PrivateTmp=); install it into a virtualenv such as /opt/maildesk"
                )
    if any(c.isspace() or c in "%\\\"'$" for c in str(program)):
        raise ServiceError(f"{program}: a unit file cannot name this path as it is; "
                           "install maildesk under a plain path such as /opt/maildesk")


def render_unit(name: str, program: Path) -> str:
    """A unit file's text with the installed program in place of the repository's one."""
    text = _source(f"systemd/{name}").read_text(encoding="utf-8")
    if name.endswith(".service") and UNIT_PROGRAM not in text:
        raise ServiceError(f"{name} names no {UNIT_PROGRAM} to replace")
    return text.replace(UNIT_PROGRAM, str(program))


def _write_new(path: Path, text: str, mode: int) -> None:
    """Write `path` whole, or not at all."""
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(text, encoding="utf-8")
    partial.chmod(mode)
    partial.replace(path)


def systemd_running() -> bool:
    """Whether this machine was booted with systemd (sd_booted(3)'s test)."""
    return Path("/run/systemd/system").is_dir()


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in (result.stderr or result.stdout).splitlines()]
    return next((line for line in reversed(lines) if line), f"exit code {result.returncode}")


def install(root: Path, program: Path, *, start: bool) -> list[Step]:
    """Install under `root`; `start` asks systemd to (re)start the units. Returns the steps."""
    on_target = root == Path("/")
    steps: list[Step] = []
    # Everything is read before anything is written, so that a missing file writes nothing.
    units = {name: render_unit(name, program) for name in UNIT_FILES}
    sample = _source("config.toml").read_text(encoding="utf-8")
    config_dir = root / CONFIG_DIR
    config_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    config = config_dir / "config.toml"
    shown_config = Path("/") / CONFIG_DIR / "config.toml"
    config_existed = config.exists()
    if config_existed:
        steps.append(Step("done", f"kept the existing {shown_config}"))
    else:
        # Only root reads it: the service gets it as a credential (LoadCredential=).
        _write_new(config, sample, 0o600)
        steps.append(Step("done", f"wrote {shown_config} from the sample: edit it (the desk's "
                                  "address, IMAP, the SMTP relay, the privacy values)"))

    unit_dir = root / UNIT_DIR
    unit_dir.mkdir(parents=True, exist_ok=True)
    for name, text in units.items():
        _write_new(unit_dir / name, text, 0o644)
    steps.append(Step("done", f"put {', '.join(UNIT_FILES)} in /{UNIT_DIR}, running {program}"))

    upgrade = [str(program), "--config", str(config), "db", "upgrade"]
    if on_target or config_existed:
        result = _run(upgrade)
        if result.returncode != 0:
            steps.append(Step("failed", f"maildesk db upgrade: {_one_line(result)}"))
            return steps
        steps.append(Step("done", f"maildesk db upgrade: {_one_line(result)}"))
    else:
        # The sample names the target's /var/lib/maildesk, which is outside `root`.
        steps.append(Step("to do", "maildesk db upgrade: the new config names the target's "
                                   "database, outside --root; the service runs it at each "
                                   f"start, or run `maildesk --config {shown_config} db upgrade`"))

    systemctl = shutil.which("systemctl")
    if systemctl is None:
        steps.append(Step("to do", "no systemctl here: enable and start "
                                   f"{' '.join(ENABLED_UNITS)} with the init system"))
        return steps
    enable = [systemctl, *([] if on_target else [f"--root={root}"]), "enable", *ENABLED_UNITS]
    if start and on_target:
        for command in ([systemctl, "daemon-reload"], enable,
                        [systemctl, "restart", *ENABLED_UNITS]):
            result = _run(command)
            if result.returncode != 0:
                steps.append(Step("failed", f"{' '.join(command[1:])}: {_one_line(result)}"))
                return steps
        steps.append(Step("done", f"enabled and started {' '.join(ENABLED_UNITS)}; see "
                                  "`systemctl status maildesk` and `journalctl -u maildesk`"))
        return steps
    result = _run(enable)
    if result.returncode != 0:
        steps.append(Step("failed", f"systemctl enable: {_one_line(result)}"))
        return steps
    steps.append(Step("done", f"enabled {' '.join(ENABLED_UNITS)}"))
    why = "systemd is not running here" if on_target else "installed under --root"
    finish = f"systemctl daemon-reload && systemctl start {' '.join(ENABLED_UNITS)}"
    steps.append(Step("to do", f"not started ({why}); on the running target machine: {finish}"))
    return steps
