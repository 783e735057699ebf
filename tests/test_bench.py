"""The benchmarks in bench/ still run: each at a tiny size, all at once, each with its own rig.

Speed is never asserted; what is asserted is that each script exits 0, prints its figure beside
its baseline (a ratio), and, for the chaos run, that no mail was lost and no ticket doubled.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
RUNS = {
    "ingest": ["-n", "20"],
    "latency": ["-n", "3", "--interval", "0.05"],
    "outbox": ["-n", "30"],
    "scale": ["-n", "10", "--tickets", "500"],
    "memory": ["-n", "10"],
    "chaos": ["-n", "20", "--kills", "4"],
}


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Every benchmark started at once, so that the module takes as long as the slowest."""
    started = {
        name: subprocess.Popen([sys.executable, str(BENCH / f"{name}.py"), *options],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, options in RUNS.items()
    }
    try:
        yield started
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def finished(runs: dict[str, subprocess.Popen[str]], name: str) -> str:
    """The benchmark's output, once it exited 0."""
    out, err = runs[name].communicate(timeout=120)
    assert runs[name].returncode == 0, f"bench/{name}.py exited {runs[name].returncode}:\n{err}"
    return out


@pytest.mark.parametrize("name", ["ingest", "latency", "outbox", "scale", "memory"])
def test_benchmark_prints_its_ratio(runs: dict[str, subprocess.Popen[str]], name: str) -> None:
    out = finished(runs, name)
    assert " ratio " in out, out
    assert "FAIL" not in out, out


def test_chaos_loses_nothing(runs: dict[str, subprocess.Popen[str]]) -> None:
    out = finished(runs, "chaos")
    assert "4 SIGKILLs" in out, out
    assert "mails lost 0 " in out, out
    assert "tickets doubled 0 " in out, out
    assert "always under the same Message-ID: yes" in out, out
