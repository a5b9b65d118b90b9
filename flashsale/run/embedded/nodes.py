"""Single redis-server nodes for a test topology (data nodes and sentinels):
a child that dies with us, a minimal RESP client for admin commands, and
``INFO`` parsed. Used by :mod:`flashsale.run.embedded.sentinel`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from flashsale.run.embedded.proc import death_pact

LOOPBACK = "127.0.0.1"


class TopologyError(Exception):
    """The topology did not reach the state asked for in time."""


def command(port: int, *args: str, timeout_s: float = 1.0) -> str:
    """One command over a raw RESP connection (no client library: usable from
    sync fixtures and while an event loop runs elsewhere). Returns the reply as
    text: a bulk string, a status, an integer, or the items of a flat array
    joined by newlines; raises TopologyError on an error reply or no answer."""
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        raw = a.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as sock:
            sock.sendall(b"".join(parts))
            f = sock.makefile("rb")
            return _read_reply(f)
    except OSError as exc:
        raise TopologyError(f"port {port}: {args[0]} failed: {exc}") from None


def _read_reply(f: object) -> str:
    readline = f.readline  # type: ignore[attr-defined]
    read = f.read  # type: ignore[attr-defined]
    line: bytes = readline()
    if not line:
        raise OSError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"-":
        raise TopologyError(rest.decode())
    if kind in (b"+", b":"):
        return str(rest.decode())
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return ""
        data: bytes = read(n + 2)
        return data[:-2].decode()
    if kind == b"*":
        n = int(rest)
        return "\n".join(_read_reply(f) for _ in range(max(n, 0)))
    raise OSError(f"unexpected reply {line!r}")


def info(port: int, section: str = "replication") -> dict[str, str]:
    """INFO <section> of a node as a dict."""
    out: dict[str, str] = {}
    for line in command(port, "INFO", section).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def replicas_ok(port: int, count: int) -> bool:
    """The node is a primary with ``count`` replicas online whose lag is within
    min-replicas-max-lag (good for min-replicas-to-write: it takes writes)."""
    rep = info(port)
    online = sum(1 for k, v in rep.items() if k.startswith("slave") and "state=online" in v)
    good = int(rep.get("min_slaves_good_slaves", online))  # lag within bound
    return rep.get("role") == "master" and online >= count and good >= count


@dataclass
class Node:
    """One redis-server child: a data node or a sentinel."""

    name: str
    port: int
    dir: Path
    argv: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    starts: int = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, argv: list[str], timeout_s: float = 10.0) -> None:
        assert not self.alive, f"{self.name} is running"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.argv = argv
        with (self.dir / f"{self.name}.log").open("ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=death_pact(os.getpid()),
            )
        self.starts += 1
        self.paused = False
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(TopologyError):
                if command(self.port, "PING") == "PONG":
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise TopologyError(f"{self.name} did not start on port {self.port}: "
                                    f"{self.log_tail()}")
            time.sleep(0.02)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the process stops; its sockets stay open (a hung server)."""
        assert self.alive
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.alive and self.paused:
            os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.dir / f"{self.name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
