"""glibc's malloc gives large freed buffers back to the system once the daemon has set it."""

from __future__ import annotations

import subprocess
import sys

# Run in a child, so that the test's own interpreter keeps its malloc settings. A worker thread
# allocates 64 MiB in 4 MiB buffers, with small long-lived objects in between (as filing a mail
# leaves rows and strings behind), frees the buffers, and does it again, five times.
PROBE = """
import sys, threading
from maildesk.heap import return_freed_memory
if sys.argv[1] == "set":
    assert return_freed_memory()
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
before = rss()
kept = []
def work():
    for _ in range(5):
        buffers = []
        for _ in range(16):
            buffers.append(bytearray(4 * 1024 * 1024))
            kept.append(bytearray(2000))
        del buffers
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(rss() - before)
"""


def grown_mib(mode: str) -> int:
    """How much the probe's resident set grew, in MiB."""
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def test_freed_large_buffers_leave_the_resident_set() -> None:
    assert grown_mib("set") < 16


def test_without_the_setting_glibc_keeps_them() -> None:
    # The control: the probe does show what the setting is for on this machine's glibc.
    assert grown_mib("default") > 32
