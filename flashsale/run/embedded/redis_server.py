"""The embedded ``redis-server``: its command line, password and readiness probe.

The server keeps its data in an AOF under ``data_dir/redis`` and requires a
password (``requirepass``), so another local user cannot reach the stock. The
password is written to a config file (mode 0600, owned by the server's user)
rather than the command line, which any local user can read in ``/proc``.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flashsale.run.embedded.proc import LOOPBACK, Aborted, Child, ServerExited
from flashsale.run.embedded.users import RunAs, private_file

CONF_FILE = "redis.conf"
_PID_RE = re.compile(rb"\r\nprocess_id:(\d+)\r\n")
_PROBE_TIMEOUT_S = 1.0
_REPLY_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class RedisSpec:
    """Everything needed to (re)start the embedded Redis on a given port."""

    binary: Path
    directory: Path
    password: str
    appendfsync: str
    extra_args: tuple[str, ...] = ()

    def write_conf(self, who: RunAs | None) -> Path:
        """The config file holding the password (rewritten on every start)."""
        return private_file(self.directory / CONF_FILE, f"requirepass {self.password}\n", who)

    def argv(self, port: int) -> list[str]:
        return [
            str(self.binary),
            str(self.directory / CONF_FILE),  # first argument: the config file
            "--port", str(port),
            "--bind", LOOPBACK,
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip

    def url(self, port: int) -> str:
        return f"redis://:{self.password}@{LOOPBACK}:{port}/0"


def _command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        raw = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _replies(data: bytes) -> list[bytes] | None:
    """The complete top-level replies in ``data`` (simple, error or bulk), or
    None while the last one is incomplete."""
    replies: list[bytes] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        if end < 0:
            return None
        head = data[pos:end]
        if head[:1] == b"$" and head != b"$-1":
            size = int(head[1:])
            if len(data) < end + 2 + size + 2:
                return None
            replies.append(data[end + 2 : end + 2 + size])
            pos = end + 2 + size + 2
        else:
            replies.append(head)
            pos = end + 2
    return replies


def server_pid(port: int, password: str) -> int | None:
    """``process_id`` of the server on ``port`` once it serves *authenticated*
    commands, else None (refused, ``-LOADING`` while reading the AOF, or a
    server that does not know our password)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=_PROBE_TIMEOUT_S) as sock:
            sock.sendall(_command("AUTH", password) + _command("INFO", "server"))
            data = b""
            while (replies := _replies(data)) is None or len(replies) < 2:
                chunk = sock.recv(4096)
                if not chunk or len(data) > _REPLY_MAX_BYTES:
                    return None
                data += chunk
    except (OSError, ValueError):
        return None
    auth, info = replies[0], replies[1]
    if auth != b"+OK":
        return None
    match = _PID_RE.search(b"\r\n" + info)
    return int(match.group(1)) if match else None


def wait_ready(
    child: Child, password: str, timeout_s: float, abort: threading.Event | None = None
) -> None:
    """Wait until *our* process answers on the port (not some other server)."""
    deadline = time.monotonic() + timeout_s
    while server_pid(child.port, password) != child.proc.pid:
        if child.proc.poll() is not None:
            raise ServerExited
        if abort is not None and abort.is_set():
            raise Aborted
        if time.monotonic() > deadline:
            raise child.failure(f"did not serve commands within {timeout_s:.0f}s")
        time.sleep(0.05)
