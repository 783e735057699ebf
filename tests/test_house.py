"""The house: the import rules between the parts of maildesk hold, and the check can fail.

The contracts live in pyproject.toml ([tool.importlinter]); import-linter checks them. It has no
contract for circles between single modules, so `find_cycle` looks for those in grimp's graph.
"""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def find_cycle(graph: grimp.ImportGraph, package: str) -> list[str] | None:
    """A circle of direct imports between the modules of `package`, or None."""
    modules = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if not imported.startswith(package):
                continue
            if state.get(imported) == 1:
                return [*path[path.index(imported) :], imported]
            if imported not in state:
                found = visit(imported)
                if found:
                    return found
        path.pop()
        state[module] = 2
        return None

    for module in modules:
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120,
    )


def _copy_of_the_house(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "maildesk", tmp_path / "maildesk",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_import_contracts_are_kept() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout


def test_no_module_imports_itself_through_others() -> None:
    graph = grimp.build_graph("maildesk", include_external_packages=False, cache_dir=None)
    assert find_cycle(graph, "maildesk") is None


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("rules/classify.py", "from maildesk.store import models", "mail and rules are pure"),
        ("mail/parse.py", "import sqlalchemy", "mail and rules are pure"),
        ("store/tickets.py", "from maildesk.outbound import notify", "the store knows nothing"),
        ("outbound/notify.py", "from maildesk.mail import parse", "outbound never parses"),
        ("daemon.py", "from maildesk.cli import main", "nothing imports the CLI"),
    ],
)
def test_a_broken_never_is_reported(tmp_path: Path, module: str, line: str, broken: str) -> None:
    root = _copy_of_the_house(tmp_path)
    target = root / "maildesk" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    result = _lint(root)
    assert result.returncode == 1
    reported = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    # The import may close a circle between the parts too, which that contract reports as well.
    assert [row for row in reported if row.startswith(broken)], result.stdout
    assert all(row.startswith((broken, "the parts of the house")) for row in reported)


def test_an_import_circle_is_found(tmp_path: Path) -> None:
    root = _copy_of_the_house(tmp_path)
    # signing is imported by the pipeline (through notify and route); importing the pipeline
    # back closes a circle.
    signing = root / "maildesk" / "signing.py"
    signing.write_text(signing.read_text() + "\nimport maildesk.pipeline  # noqa\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(root)!r})
        import grimp
        {textwrap.indent(inspect.getsource(find_cycle), "        ").strip()}
        graph = grimp.build_graph("maildesk", include_external_packages=False, cache_dir=None)
        print(" -> ".join(find_cycle(graph, "maildesk") or []))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=root, timeout=120, check=True)
    cycle = result.stdout.strip().split(" -> ")
    assert "maildesk.signing" in cycle and "maildesk.pipeline" in cycle
    assert cycle[0] == cycle[-1]
