"""Process plumbing of the embedded servers: children that die with us, logs,
ports (binaries: binaries.py; the unprivileged user: users.py).

Used by :mod:`flashsale.run.embedded.servers` (the public class),
:mod:`flashsale.run.embedded.redis_server` and :mod:`flashsale.run.embedded.postgres_server`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from flashsale.run.embedded.users import RunAs

_T = TypeVar("_T")

LOOPBACK = "127.0.0.1"
ADDR_IN_USE = "address already in use"
_LAST_LINE_MAX = 400


class EmbeddedError(Exception):
    """An embedded server could not be found, started or reached."""


# ---------------------------------------------------------------------------
# Spawning children that die with us
# ---------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_LIBC: ctypes.CDLL | None = (
    ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
)


def death_pact(parent_pid: int) -> Callable[[], None]:
    """preexec_fn: SIGKILL this child when the parent dies (runs after setuid)."""

    def preexec() -> None:
        if _LIBC is not None:
            option = ctypes.c_int(_PR_SET_PDEATHSIG)
            sig, zero = ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0)
            if _LIBC.prctl(option, sig, zero, zero, zero) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


_spawn_jobs: queue.SimpleQueue[Callable[[], None]] | None = None
_spawn_lock = threading.Lock()


def _spawner_loop(jobs: queue.SimpleQueue[Callable[[], None]]) -> None:
    while True:
        jobs.get()()


def _spawner() -> queue.SimpleQueue[Callable[[], None]]:
    global _spawn_jobs
    with _spawn_lock:
        if _spawn_jobs is None:
            _spawn_jobs = queue.SimpleQueue()
            threading.Thread(
                target=_spawner_loop, args=(_spawn_jobs,), name="embedded-spawner", daemon=True
            ).start()
        return _spawn_jobs


def _in_lasting_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` in a thread that lives as long as the process.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so
    children must not be forked from short-lived threads (e.g. asyncio.to_thread).
    """
    if threading.current_thread() is threading.main_thread():
        return fn()
    future: concurrent.futures.Future[_T] = concurrent.futures.Future()

    def job() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    _spawner().put(job)
    return future.result()


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    return env


def popen(
    argv: Sequence[str], *, log: IO[bytes], cwd: Path, who: RunAs | None
) -> subprocess.Popen[bytes]:
    ids: dict[str, Any] = {}
    if who is not None:
        ids = {"user": who.uid, "group": who.gid, "extra_groups": []}
    preexec = death_pact(os.getpid())

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=_child_env(),
            start_new_session=True,
            preexec_fn=preexec,
            **ids,
        )

    try:
        return _in_lasting_thread(spawn)
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedError(f"could not start {argv[0]}: {exc}") from exc


# ---------------------------------------------------------------------------
# Small helpers: ports, logs, locks, async
# ---------------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, start: int, lines: int = 40) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            data = fh.read()
    except OSError:
        return "(no log)"
    text = data.decode("utf-8", "replace").rstrip()
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def open_log(path: Path, title: str) -> tuple[IO[bytes], int]:
    log = path.open("ab")
    start = log.tell()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    log.write(f"===== {title} at {stamp} (flashsale pid {os.getpid()}) =====\n".encode())
    log.flush()
    return log, start


def run_coroutine(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion, even when called from inside an event loop."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embedded") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------


class ServerExited(Exception):
    """The server process exited while we waited for it to accept connections."""


class Aborted(Exception):
    """A wait for a server was abandoned because the servers are being stopped."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: IO[bytes]
    log_path: Path
    log_start: int
    stop_signal: signal.Signals

    def tail(self) -> str:
        return log_tail(self.log_path, self.log_start)

    def failure(self, what: str) -> EmbeddedError:
        return EmbeddedError(f"{self.name}: {what}; last lines of {self.log_path}:\n{self.tail()}")

    def last_log_line(self, lines: int = 3) -> str:
        """The server's last lines of output since this start, on one line
        (PostgreSQL spreads one message over several), bounded."""
        tail = log_tail(self.log_path, self.log_start, lines + 1).splitlines()
        text = " | ".join(line.strip() for line in tail if not line.startswith("====="))
        return text[-_LAST_LINE_MAX:] if text else "(no output)"

    def send(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def reap(self, timeout_s: float) -> None:
        try:
            self.proc.wait(timeout=max(timeout_s, 0.0))
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def stop_children(children: Sequence[Child], timeout_s: float) -> None:
    for child in children:
        child.send(child.stop_signal)
    deadline = time.monotonic() + timeout_s
    for child in children:
        child.reap(deadline - time.monotonic())

