"""Start a helper child: a fresh interpreter running one line of code, talking over two pipes.

The parse worker (mail/worker.py) and the sender's compose child (outbound/compose_worker.py)
both start their children this way: subprocess rather than multiprocessing's spawn, which would
run the `maildesk` console script (and import the whole CLI) again in every child.
"""

from __future__ import annotations

import os
import subprocess
import sys
from multiprocessing.connection import Connection


def start_child(
    code: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Connection, Connection]:
    """Run `python -P -c code DOWN UP`; the process and the parent's ends (to it, from it).

    The child reads the pipe whose descriptor is its first argument and writes the second.
    """
    down_read, down_write = os.pipe()
    up_read, up_write = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-P", "-c", code, str(down_read), str(up_write)],
            pass_fds=(down_read, up_write), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # The pipes carry the answers; stderr stays ours.
            env=env,
        )  # fmt: skip
    except BaseException:
        for fd in (down_write, up_read):
            os.close(fd)
        raise
    finally:
        # The child holds these ends now: its death is then the EOF of ours.
        os.close(down_read)
        os.close(up_write)
    return process, Connection(down_write, readable=False), Connection(up_read, writable=False)
