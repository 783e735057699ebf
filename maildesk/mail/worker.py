"""Parse mails in a child process, each within a CPU budget, so that no mail can hold the daemon.

The email package may spend seconds of CPU on a hostile mail, and the memory that a big mail took
does not go back to the OS. So `ParseWorker` hands each mail to a child, a fresh interpreter
started by subprocess for the first mail and kept for the next. Not multiprocessing's spawn or
forkserver: they make every child run the main script again (the forkserver's `__main__` preload
is dead code before Python 3.13, CPython issue 126631), and under the `maildesk` console script
that imports the whole CLI, 0.7 s and 60 MB per child, where this child takes 0.1 s and 20 MB.

Before each mail the child sets its soft RLIMIT_CPU to the CPU it has used plus the budget, so
that a parse that spins, even in C code or with the daemon gone, dies of SIGXCPU. A wall-clock
deadline in the parent ends a child that blocks, and RLIMIT_AS makes a memory bomb a
MemoryError. A child that ran out of memory, read `recycle_after_bytes` of mail or grew past
`max_rss_bytes` is ended, which gives its memory back; the next mail starts a new one.

Results come back pickled whole, EmailMessage included (tens of milliseconds for a 20 MB mail,
whose parse takes a second), the parse policy by reference so that it is `limits.POLICY` again,
and the daemon unpickles only the classes a parsed mail is made of: the child read hostile input.
"""

from __future__ import annotations

import email.policy
import io
import math
import os
import pickle
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from maildesk.child_process import start_child
from maildesk.heap import return_freed_memory
from maildesk.mail.limits import POLICY, ParseLimits
from maildesk.mail.message import MalformedMail, ParsedMail
from maildesk.mail.parse import parse_mail, read_mail_file
from maildesk.mail.sparse import SparseMail
from maildesk.mail.spool import discard

ParseFunction = Callable[[bytes | SparseMail, ParseLimits], ParsedMail]

# Policies that a parsed mail holds, pickled by name so that they come back as the same objects.
_POLICIES: dict[str, email.policy.Policy] = {"maildesk": POLICY, "default": email.policy.default}
# What a pickled result may name: the classes a parsed mail is made of, and nothing that runs.
_SAFE_MODULES = ("email.", "maildesk.mail.message", "datetime")
_EXIT_NO_MEMORY = 86  # The child's exit code when it could not even read the mail.
# A request to the child: a mail's bytes, or the path of a file holding them, so that the daemon
# need not read a large mail only to pass it on.
_MAIL, _FILE = b"M", b"F"
_REAP_SECONDS = 5.0  # How long a child that was killed, or closed its pipe, may take to go.
# -P: the daemon's working directory, its state directory, is not a place to import from.
_CHILD_CODE = "from maildesk.mail.worker import child_main; child_main()"


class WorkerStopped(Exception):
    """The worker was stopped: the mail was not parsed, and should be tried again later."""


def _named_policy(name: str) -> email.policy.Policy:
    """The policy that `_ResultPickler` pickled by name."""
    return _POLICIES[name]


class _ResultPickler(pickle.Pickler):
    """Pickle a result with its policies by reference (by value, each would carry a registry)."""

    def reducer_override(self, obj: Any) -> Any:
        for name, policy in _POLICIES.items():
            if obj is policy:
                return _named_policy, (name,)
        return NotImplemented


class _ResultUnpickler(pickle.Unpickler):
    """Unpickle a result that the child made from hostile input: only the types of a mail."""

    def find_class(self, module: str, name: str) -> Any:
        if not module.startswith(_SAFE_MODULES) and (module, name) != (__name__, "_named_policy"):
            raise pickle.UnpicklingError(f"a parse result may not hold {module}.{name}")
        return super().find_class(module, name)


def dump_result(result: object) -> bytes:
    """Pickle what the child sends back, as the worker does."""
    _ResultPickler(out := io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL).dump(result)
    return out.getvalue()


def load_result(data: bytes) -> Any:
    """Unpickle what `dump_result` made, allowing only the types of a parsed mail."""
    return _ResultUnpickler(io.BytesIO(data)).load()


# The child's side.


def _statm(field: int) -> int | None:
    """A field of /proc/self/statm in bytes (0: address space, 1: resident), where it exists."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[field]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _rss() -> int:
    """This process's resident memory now, else (off Linux) its peak."""
    resident = _statm(1)
    if resident is not None:
        return resident
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Bytes on macOS, KiB elsewhere.


def _set_soft_limit(which: int, soft: int) -> None:
    """Set a soft resource limit, within the hard one, which is left alone."""
    hard = resource.getrlimit(which)[1]
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))


def _caused_by_memory(exc: BaseException) -> bool:
    """Whether an exception, or one it was raised from, is a MemoryError."""
    seen: BaseException | None = exc
    for _ in range(20):  # The chain of a parse failure is short; a loop in it must not hang.
        if seen is None:
            return False
        if isinstance(seen, MemoryError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _answer(
    parse: ParseFunction, raw: bytes | SparseMail, limits: ParseLimits
) -> tuple[str, object]:
    """Parse one mail: ("ok", mail), ("malformed", reason), ("memory", None) or ("error", text)."""
    try:
        return "ok", parse(raw, limits)
    except MalformedMail as exc:
        # parse_mail turns whatever the email package raised into MalformedMail, MemoryError too.
        return ("memory", None) if _caused_by_memory(exc) else ("malformed", exc.reason)
    except MemoryError:
        return "memory", None
    except Exception as exc:
        if isinstance(exc, OSError) and isinstance(raw, SparseMail):
            return "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}"
        return "error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def _answer_request(
    parse: ParseFunction, request: bytes, limits: ParseLimits
) -> tuple[str, object]:
    """Answer one request: a mail's bytes after _MAIL, or the path of its file after _FILE."""
    if request.startswith(_FILE):
        try:
            raw = read_mail_file(os.fsdecode(request[len(_FILE) :]), limits)
        except MemoryError:
            return "memory", None
        except OSError as exc:
            return "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}"
        return _answer(parse, raw, limits)
    return _answer(parse, request[len(_MAIL) :], limits)


def child_main() -> None:
    """The child: parse each mail that comes down the pipe, and send back the pickled answer."""
    # Only the parent ends a parse: a Ctrl-C in a terminal, or systemd's SIGTERM to the whole
    # unit, must not kill a child mid-parse and have its mail quarantined as a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return_freed_memory()
    # A child killed by SIGXCPU or SIGABRT must leave no core behind, of up to max_memory.
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    incoming = Connection(int(sys.argv[1]), writable=False)
    outgoing = Connection(int(sys.argv[2]), readable=False)
    # The parent's sys.path comes first, so that the parse function imports as it did there.
    sys.path[:] = os.fsdecode(incoming.recv_bytes()).split("\0")
    config = incoming.recv_bytes()
    parse, limits, budget, max_memory = pickle.loads(config)  # noqa: S301 (from the parent)
    address_space = _statm(0)
    if max_memory is not None and address_space is not None:
        _set_soft_limit(resource.RLIMIT_AS, address_space + max_memory)
    while True:
        try:
            request = incoming.recv_bytes()
        except EOFError:
            return  # The parent closed the pipe, or is gone.
        except MemoryError:
            os._exit(_EXIT_NO_MEMORY)  # The rest of the mail is still in the pipe: no going on.
        used = resource.getrusage(resource.RUSAGE_SELF)
        _set_soft_limit(resource.RLIMIT_CPU, math.ceil(used.ru_utime + used.ru_stime + budget))
        kind, value = _answer_request(parse, request, limits)
        del request
        try:
            reply = dump_result((kind, value, _rss()))
        except MemoryError:
            reply = dump_result(("memory", None, _rss()))
        except Exception as exc:
            reply = dump_result(("error", f"cannot pickle the result ({exc})", _rss()))
        del value
        outgoing.send_bytes(reply)


# The parent's side.


class _Child:
    """One child process and the parent's ends of its two pipes."""

    def __init__(self, config: bytes) -> None:
        self.process, self.to_child, self.from_child = start_child(_CHILD_CODE)
        self.parsed_bytes = 0
        try:
            self.to_child.send_bytes(os.fsencode("\0".join(sys.path)))
            self.to_child.send_bytes(config)
        except OSError:
            self.end()
            raise

    def end(self) -> None:
        """Kill the child, reap it and close the pipes."""
        self.process.kill()
        try:
            self.process.wait(_REAP_SECONDS)
        except subprocess.TimeoutExpired:
            pass  # Popen reaps it later; the pipes can go now.
        self.to_child.close()
        self.from_child.close()


class _Slot:
    """A place for one child; the thread that took the slot from the pool owns its child."""

    def __init__(self) -> None:
        # Guards `child` against stop() from another thread; re-entrant, so that stop() may also
        # come from a signal handler that interrupted the owner while it held the lock.
        self.lock = threading.RLock()
        self.child: _Child | None = None

    def kill(self) -> None:
        """Kill the child, if any, leaving its owner to see it die and reap it."""
        with self.lock:
            if self.child is not None:
                self.child.process.kill()

    def retire(self) -> None:
        """End the child, if any."""
        with self.lock:
            child, self.child = self.child, None
        if child is not None:
            child.end()


class ParseWorker:
    """Parses mails in a child process, each within a CPU budget; stop() ends it at once."""

    def __init__(
        self,
        *,
        cpu_seconds: float = 10.0,
        max_rss_bytes: int | None = 512 * 2**20,
        recycle_after_bytes: int = 64 * 2**20,
        limits: ParseLimits | None = None,
        processes: int = 1,
        wall_seconds: float | None = None,
        parse_function: ParseFunction = parse_mail,
    ) -> None:
        """Set the bounds; no child starts before the first mail.

        The CPU budget holds to within a second (RLIMIT_CPU counts whole seconds); wall_seconds,
        by default 3 * cpu_seconds + 1, bounds a parse that blocks. max_rss_bytes bounds the
        memory one parse may add to a child, and the child's resident memory between mails.
        Each of the `processes` children parses one mail at a time. parse_function, for tests,
        must be a module-level function that the child can import.
        """
        if cpu_seconds <= 0 or processes < 1:
            raise ValueError("cpu_seconds must be positive and processes at least 1")
        self.cpu_seconds = cpu_seconds
        self.wall_seconds = 3 * cpu_seconds + 1 if wall_seconds is None else wall_seconds
        self.max_rss_bytes = max_rss_bytes
        self.recycle_after_bytes = recycle_after_bytes
        limits = limits or ParseLimits()
        self._spool_dir = None if limits.spool_dir is None else os.path.realpath(limits.spool_dir)
        # Pickled here, so that a parse function that cannot be sent fails now, not per child.
        self._config = pickle.dumps((parse_function, limits, cpu_seconds, max_rss_bytes))
        self.started = 0  # Children started so far.
        self.recycled = 0  # Children ended for their memory, or after a parse that broke them.
        self._slots = [_Slot() for _ in range(processes)]
        self._idle = list(self._slots)
        self._pool = threading.Condition(threading.RLock())
        self._stopped = False

    def parse(self, raw: bytes) -> ParsedMail:
        """Parse one mail in a child; MalformedMail if it is bad or breaks a bound.

        WorkerStopped once stop() was called; OSError if no child could be started.
        """
        return self._request(_MAIL + raw, len(raw))

    def parse_file(self, path: str | os.PathLike[str]) -> ParsedMail:
        """Parse the mail kept in a file, which the child reads itself; as parse() otherwise.

        OSError when the child cannot read the file.
        """
        return self._request(_FILE + os.fsencode(path), os.path.getsize(path))

    def _request(self, request: bytes, size: int) -> ParsedMail:
        slot = self._take()
        try:
            return self._parse_in(slot, request, size)
        finally:
            with self._pool:
                self._idle.append(slot)
                self._pool.notify()
            if self._stopped:
                slot.retire()

    def stop(self) -> None:
        """Kill every child now; parse() in progress, and after, raises WorkerStopped."""
        self._stopped = True
        for slot in self._slots:
            slot.kill()
        with self._pool:
            self._pool.notify_all()

    def close(self) -> None:
        """Stop, and reap the children that no parse() holds (the others go with their parse)."""
        self.stop()
        with self._pool:
            idle = list(self._idle)
        for slot in idle:
            slot.retire()

    @property
    def pids(self) -> list[int]:
        """The process ids of the children running now."""
        children = [slot.child for slot in self._slots]  # Read once: stop() may clear them.
        return [child.process.pid for child in children if child is not None]

    def __enter__(self) -> ParseWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _take(self) -> _Slot:
        with self._pool:
            while not self._stopped and not self._idle:
                self._pool.wait()
            if self._stopped:
                raise WorkerStopped("the parse worker was stopped")
            return self._idle.pop()

    def _start(self, slot: _Slot) -> _Child:
        """Start a child in the slot; if stop() came meanwhile, kill it."""
        child = _Child(self._config)
        with slot.lock:
            slot.child = child
        with self._pool:
            self.started += 1
        if self._stopped:  # stop() may have looked at the slot before the child was in it.
            slot.kill()
        return child

    def _parse_in(self, slot: _Slot, request: bytes, size: int) -> ParsedMail:
        child = slot.child or self._start(slot)
        try:
            child.to_child.send_bytes(request)
            deadline = time.monotonic() + self.wall_seconds
            while not child.from_child.poll(max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    self._recycle(slot)
                    raise MalformedMail(f"parsing took over {self.wall_seconds:g} s of real time")
            reply = child.from_child.recv_bytes()
        except (EOFError, OSError):
            if self._stopped:
                raise WorkerStopped("the parse worker was stopped") from None
            raise MalformedMail(self._death(slot, child)) from None
        try:
            kind, value, rss = load_result(reply)
        except (pickle.UnpicklingError, ValueError, TypeError) as exc:
            self._recycle(slot)
            raise MalformedMail(f"parser crashed: its result was unreadable ({exc})") from None
        del reply
        child.parsed_bytes += size
        too_big = self.max_rss_bytes is not None and rss > self.max_rss_bytes
        if kind in ("memory", "error") or too_big or child.parsed_bytes > self.recycle_after_bytes:
            # Running out of memory, or a bug, may have left the child fragmented or damaged.
            self._recycle(slot)
        if kind == "ok" and isinstance(value, ParsedMail):
            self._check_spooled(value)
            return value
        if kind == "malformed":
            raise MalformedMail(str(value))
        if kind == "unreadable":
            raise OSError(f"the parse worker could not read the mail: {value}")
        if kind == "memory":
            raise MalformedMail(self._memory_reason())
        raise MalformedMail(f"parser crashed: {value if kind == 'error' else 'no ParsedMail'}")

    def _check_spooled(self, mail: ParsedMail) -> None:
        """Refuse a result naming a spool file outside the spool: filing would move that file."""
        spooled = [a.spooled for a in mail.attachments if a.spooled is not None]
        inside = [
            f for f in spooled
            if self._spool_dir is not None
            and os.path.dirname(os.path.realpath(f.path)) == self._spool_dir
        ]  # fmt: skip
        if len(inside) < len(spooled):
            discard(inside)  # Only its own files: the others are none of ours to remove.
            raise MalformedMail("parser crashed: it named a file outside the spool")

    def _recycle(self, slot: _Slot) -> None:
        slot.retire()
        with self._pool:
            self.recycled += 1

    def _death(self, slot: _Slot, child: _Child) -> str:
        """Reap a child that died during a parse and say why it did."""
        try:
            code: int | None = child.process.wait(_REAP_SECONDS)
        except subprocess.TimeoutExpired:
            code = None
        self._recycle(slot)
        if code == -signal.SIGXCPU:
            return f"parsing took over {self.cpu_seconds:g} s of CPU"
        if code == _EXIT_NO_MEMORY:
            return self._memory_reason()
        if code is None:
            return "parser crashed: it closed its pipe"
        if code < 0:
            return f"parser crashed: killed by {signal.Signals(-code).name}"
        return f"parser crashed: exit code {code}"

    def _memory_reason(self) -> str:
        if self.max_rss_bytes is None:
            return "parsing ran out of memory"
        return f"parsing needed more than {self.max_rss_bytes / 2**20:g} MiB"
