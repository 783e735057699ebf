"""Give freed memory back to the system: glibc's malloc settings for a long-running daemon.

By default glibc serves a large allocation from the heap once a buffer of that size has been
freed (its mmap threshold grows up to 32 MiB), and it keeps one arena per thread. After a 20 MB
attachment has gone through, the daemon's resident size stays at its peak for good, a few times
over across threads. A fixed threshold keeps every buffer of 256 KiB and more in its own mapping,
returned to the system when freed; two arenas suffice for our few threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 * 1024
TRIM_THRESHOLD = 1024 * 1024
ARENA_MAX = 2


def return_freed_memory() -> bool:
    """Set glibc's malloc to give large freed buffers back; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # Not glibc (musl has no mallopt): its defaults stand.
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_ARENA_MAX, ARENA_MAX),
    ))  # fmt: skip
