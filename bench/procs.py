"""Child processes of the bench: start, wait for readiness, account CPU, stop.

Every process the bench starts is its own session (so it and its children
can be stopped by id) and dies with the bench (PR_SET_PDEATHSIG). CPU is read
from /proc: utime + stime of a process and its live descendants, plus the
cutime + cstime of reaped children (PostgreSQL's backends come and go).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Child:
    """One started process (and its descendants), with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the process forwards it to its workers), then SIGKILL its group."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout_s)
        # workers of a multi-process front exit with their parent; make sure
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def start(
    name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path,
    cwd: Path | None = None,
) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = log_path.open("ab")
    proc = subprocess.Popen(
        list(argv), env=dict(env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent,
    )
    return Child(name, proc, log_path, log)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


async def wait_http(child: Child, url: str, timeout_s: float = 30.0) -> None:
    """Until ``url`` answers 200, the child dies, or the time is up."""
    deadline = time.monotonic() + timeout_s
    last = ""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited early:\n{child.tail()}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{child.name} not ready at {url} in {timeout_s}s ({last}):\n{child.tail()}")


# ---------------------------------------------------------------------------
# /proc accounting
# ---------------------------------------------------------------------------


def stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2 :].split()


def children_of(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        with contextlib.suppress(OSError, ValueError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def descendants(pid: int) -> list[int]:
    seen: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children_of(p)
    return seen


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used by ``pid`` and its descendants (live, and reaped ones)."""
    ticks = 0
    for p in descendants(pid):
        f = stat_fields(p)
        if f is not None:
            # after the ')' : state(0) ... utime(11) stime(12) cutime(13) cstime(14)
            ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def rss_bytes(pid: int) -> int:
    f = stat_fields(pid)
    return int(f[21]) * PAGE_SIZE if f is not None else 0


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq, steal)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


@dataclass
class CpuMeter:
    """CPU seconds of named groups of process trees over a window."""

    pids: dict[str, list[int]]
    _start: dict[str, float] = field(default_factory=dict)

    def _read(self) -> dict[str, float]:
        out = {name: sum(tree_cpu_s(p) for p in pids) for name, pids in self.pids.items()}
        out["_machine"] = machine_busy_s()
        return out

    def begin(self) -> None:
        self._start = self._read()

    def end(self) -> dict[str, float]:
        """CPU seconds used per group since begin()."""
        now = self._read()
        return {name: now[name] - self._start.get(name, 0.0) for name in now}
