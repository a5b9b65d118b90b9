"""Chaos harness: flashsale processes as real children, a load generator, audits.

Every chaos test runs real processes against real servers: the HTTP front
in-process (tests.support.running_app) or as ``python -m flashsale serve``,
consumers and compensators as ``python -m flashsale consume|compensate``
children that the test kills with SIGKILL, and the checks read Redis and
PostgreSQL directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector

from flashsale import auth
from flashsale.config import Settings
from flashsale.core.backends import Backends
from flashsale.core.ledger import ledger
from flashsale.core.persist import consumer_names
from tests.support import ADMIN_TOKEN, JWT_SECRET, WEBHOOK_SECRET

REPO = Path(__file__).resolve().parents[2]
FIGURES_FILE = REPO / ".flashsale" / "chaos-figures.json"
HOLDING = ("awaiting_payment", "paid", "shipped")

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------


def write_figures(test: str, entry: Mapping[str, Any]) -> None:
    """Merge one test's figures into .flashsale/chaos-figures.json (keyed by test)."""
    FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
    with (FIGURES_FILE.parent / ".chaos-figures.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data: dict[str, Any] = {}
        if FIGURES_FILE.exists():
            with contextlib.suppress(ValueError, OSError):
                data = json.loads(FIGURES_FILE.read_text())
        data[test] = dict(entry)
        tmp = FIGURES_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(FIGURES_FILE)


# ---------------------------------------------------------------------------
# flashsale child processes
# ---------------------------------------------------------------------------


def flashsale_env(settings: Settings, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a flashsale child: the test's servers, prefix and secrets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    assert settings.redis_url and settings.database_url
    env.update(
        FLASHSALE_REDIS_URL=settings.redis_url,
        FLASHSALE_DATABASE_URL=settings.database_url,
        FLASHSALE_KEY_PREFIX=settings.key_prefix,
        FLASHSALE_CONSUMER_CLAIM_IDLE_MS=str(settings.consumer_claim_idle_ms),
        FLASHSALE_CONSUMER_MAX_DELIVERIES=str(settings.consumer_max_deliveries),
        FLASHSALE_CONSUMER_BATCH_MAX=str(settings.consumer_batch_max),
        FLASHSALE_CONSUMER_CONCURRENCY=str(settings.consumer_concurrency),
        FLASHSALE_ADMIN_TOKEN=ADMIN_TOKEN,
        FLASHSALE_JWT_SECRET=JWT_SECRET,
        FLASHSALE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        FLASHSALE_DATA_DIR=str(data_dir),
        FLASHSALE_LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the child if the test process dies (no orphans)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


class Service:
    """One ``python -m flashsale <command>`` child, restartable, killable with SIGKILL."""

    def __init__(
        self, command: str, env: Mapping[str, str], log_dir: Path, args: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        self.command = command
        self.args = tuple(args)
        self.env = dict(env)
        self.name = name or command
        self.log_path = log_dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def consumer_names(self) -> list[str]:
        """The names a consume child uses in the consumer group (Settings default;
        ``-<i>`` per consumer when it runs several, see persist.run_consumers)."""
        n = int(self.env.get("FLASHSALE_CONSUMER_CONCURRENCY", "1"))
        return consumer_names(f"{socket.gethostname()}-{self.pid}", n)

    def start(self) -> int:
        assert not self.alive, f"{self.name} is already running"
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts + 1} at {time.time():.3f}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flashsale", self.command, *self.args],
                cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            )
        self.starts += 1
        self.started_at = time.monotonic()
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.kills += 1

    async def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM (a clean stop), SIGKILL after ``timeout_s``; the exit status.
        Async: the child may need this loop (a TcpProxy in it) to shut down."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for _ in range(int(timeout_s / 0.02) + 1):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Services:
    """Every child a test started; all are killed when the test ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._all: list[Service] = []

    def add(
        self, command: str, env: Mapping[str, str], args: Sequence[str] = (),
        name: str | None = None,
    ) -> Service:
        svc = Service(command, env, self.log_dir, args, name or f"{command}-{len(self._all)}")
        self._all.append(svc)
        return svc

    def stop_all(self) -> None:
        for svc in self._all:
            if svc.alive:
                assert svc.proc is not None
                svc.proc.kill()
                svc.proc.wait()

    def logs(self) -> str:
        return "\n".join(f"== {s.name}\n{s.log_tail()}" for s in self._all)


class RedisServer:
    """A dedicated redis-server child (never the machine's shared one): no
    persistence, so a restart comes back empty, as after losing its data."""

    def __init__(self, data_dir: Path) -> None:
        from flashsale.run.embedded.servers import find_redis_server, free_port

        self.binary = find_redis_server()
        self.dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    start_timeout_s = 10.0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def persistence_args(self) -> list[str]:
        return ["--save", "", "--appendonly", "no"]

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1",
                 *self.persistence_args(), "--dir", str(self.dir), "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart_empty(self) -> None:
        """kill -9 and start again on the same port, with no data."""
        self.kill9()
        self.start()
        self.restarts += 1


async def run_cli(env: Mapping[str, str], *args: str, timeout_s: float = 60.0) -> tuple[int, str]:
    """``python -m flashsale ARGS`` to completion: (exit status, stdout)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flashsale", *args, cwd=REPO, env=dict(env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    if proc.returncode not in (0, 1):
        raise AssertionError(f"flashsale {args} exited {proc.returncode}: {err.decode()[-2000:]}")
    return proc.returncode, out.decode()


async def unacked(
    b: Backends, sale_id: str, consumers: list[str], count: int = 100_000
) -> list[Any]:
    """XPENDING entries of the sale's stream delivered to ``consumers`` (one
    process's) and not acked, at most ``count`` per consumer."""
    pend: list[Any] = []
    for name in consumers:
        pend += await b.redis.xpending_range(
            b.keys(sale_id).stream, b.settings.consumer_group, min="-", max="+", count=count,
            consumername=name,
        )
    return pend


async def consumer_joined(b: Backends, sale_id: str, svc: Service) -> bool:
    """True once the child consumer has touched the sale's consumer group."""
    if not svc.alive:
        raise AssertionError(f"{svc.name} exited: {svc.log_tail()}")
    names = set(svc.consumer_names)
    try:
        info: Any = await b.redis.xinfo_consumers(b.keys(sale_id).stream, b.settings.consumer_group)
    except Exception:
        return False
    return any(_text(c["name"]) in names for c in info)


# ---------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------


@dataclass
class Request:
    user: str
    key: str
    quantity: int


@dataclass
class LoadStats:
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    accepted: dict[str, Request] = field(default_factory=dict)  # order_id -> request
    by_key: dict[str, str] = field(default_factory=dict)  # key -> order_id
    replays: int = 0
    replay_mismatches: int = 0
    undecided: int = 0  # stopped while only 503 / errors had come back (nothing reserved)
    errors: Counter[str] = field(default_factory=Counter)  # codes of non-2xx answers
    retry_after_missing: int = 0

    def figures(self) -> dict[str, Any]:
        return {
            "requests": self.sent, "statuses": dict(self.statuses),
            "accepted_orders": len(self.accepted), "replays": self.replays,
            "replay_mismatches": self.replay_mismatches, "error_codes": dict(self.errors),
        }


class LoadGenerator:
    """Reservations at a steady rate, each with a fresh Idempotency-Key; some keys
    are replayed (same buyer, key, body) and must answer the same order. A 503 or
    a transport error is retried with the same key until decided."""

    def __init__(
        self, base: str, sale_id: str, *, rate_per_s: float, users: int, user_prefix: str,
        concurrency: int = 32, replay_every: int = 10, quantity: int = 1, seed: int = 1,
        tag: str = "k",
    ) -> None:
        self.base = base
        self.sale_id = sale_id
        self.rate_per_s = rate_per_s
        self.users = [f"{user_prefix}-{i}" for i in range(users)]
        self.tokens = {u: auth.mint(JWT_SECRET, u, 3600) for u in self.users}
        self.concurrency = concurrency
        self.replay_every = replay_every
        self.quantity = quantity
        self.rnd = random.Random(seed)
        self.tag = tag
        self.stats = LoadStats()
        self._seq = 0

    def _headers(self, user: str, key: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.tokens[user]}", "Idempotency-Key": key,
            "Content-Type": "application/json",
        }

    async def _once(self, session: ClientSession, req: Request) -> tuple[int, dict[str, Any]]:
        url = f"{self.base}/api/v1/sales/{self.sale_id}/orders"
        body = json.dumps({"quantity": req.quantity}).encode()
        async with session.post(url, data=body, headers=self._headers(req.user, req.key)) as r:
            parsed: dict[str, Any] = await r.json(content_type=None)
            if r.status in (429, 503) and "Retry-After" not in r.headers:
                self.stats.retry_after_missing += 1
            return r.status, parsed

    async def send(self, session: ClientSession, req: Request, stop: asyncio.Event) -> None:
        """One reservation, retried with the same key until decided (or stopped)."""
        while True:
            self.stats.sent += 1
            try:
                status, body = await self._once(session, req)
            except (ClientError, TimeoutError, ValueError) as exc:
                self.stats.statuses["transport_error"] += 1
                self.stats.errors[type(exc).__name__] += 1
            else:
                self.stats.statuses[str(status)] += 1
                if status == 202:
                    self._accepted(req, str(body["order_id"]))
                    return
                code = str(body.get("error", {}).get("code"))
                self.stats.errors[f"{status}:{code}"] += 1
                if status not in (429, 503):
                    return  # decided: 409 / 422 / 4xx
            if stop.is_set():
                self.stats.undecided += 1
                return
            await asyncio.sleep(0.05)

    def _accepted(self, req: Request, order_id: str) -> None:
        first = self.stats.by_key.setdefault(req.key, order_id)
        if first != order_id:
            self.stats.replay_mismatches += 1
            return
        self.stats.accepted[order_id] = req

    def next_request(self) -> Request:
        self._seq += 1
        if self.replay_every and self._seq % self.replay_every == 0 and self.stats.by_key:
            self.stats.replays += 1
            key = self.rnd.choice(list(self.stats.by_key))
            return self.stats.accepted[self.stats.by_key[key]]
        user = self.users[self._seq % len(self.users)]
        return Request(user, f"{self.tag}-{self._seq}", self.quantity)

    async def run(self, stop: asyncio.Event) -> None:
        connector = TCPConnector(limit=self.concurrency)
        async with ClientSession(connector=connector, timeout=ClientTimeout(total=10)) as session:
            jobs = itertools.repeat(lambda: self.send(session, self.next_request(), stop))
            await paced(jobs, self.rate_per_s, self.concurrency, stop)


async def paced(
    jobs: Iterable[Callable[[], Coroutine[Any, Any, object]]], rate_per_s: float,
    concurrency: int, stop: asyncio.Event,
) -> int:
    """Start the jobs at ``rate_per_s``, at most ``concurrency`` at once, until
    ``stop`` or the jobs run out (an open-loop load that falls back to the
    schedule after a stall); wait for the started ones. Returns how many started."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[object]] = set()
    next_at = loop.time()
    started = 0
    for job in jobs:
        if stop.is_set():
            break
        await sem.acquire()
        task = asyncio.create_task(job())
        started += 1
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(lambda _t: sem.release())
        next_at += 1.0 / rate_per_s
        delay = next_at - loop.time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        else:
            next_at = loop.time()
    if tasks:
        await asyncio.gather(*tasks)
    return started


async def burst(
    base: str, sale_id: str, requests: Sequence[Request], *, concurrency: int = 64
) -> list[tuple[Request, int, dict[str, Any]]]:
    """Fire requests concurrently once each (no retries): (request, status, body)."""
    tokens = {r.user: auth.mint(JWT_SECRET, r.user, 3600) for r in requests}
    results: list[tuple[Request, int, dict[str, Any]]] = []
    sem = asyncio.Semaphore(concurrency)
    url = f"{base}/api/v1/sales/{sale_id}/orders"
    async with ClientSession(connector=TCPConnector(limit=concurrency)) as session:

        async def one(req: Request) -> None:
            headers = {
                "Authorization": f"Bearer {tokens[req.user]}", "Idempotency-Key": req.key,
                "Content-Type": "application/json",
            }
            async with sem, session.post(
                url, data=json.dumps({"quantity": req.quantity}).encode(), headers=headers
            ) as r:
                body: dict[str, Any] = await r.json(content_type=None)
                if r.status in (429, 503):
                    body["retry_after"] = r.headers.get("Retry-After")
                results.append((req, r.status, body))

        await asyncio.gather(*(one(r) for r in requests))
    return results


# ---------------------------------------------------------------------------
# audits (read Redis and PostgreSQL directly)
# ---------------------------------------------------------------------------


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


@dataclass
class Audit:
    """Everything the guarantees are checked against, for one sale."""

    rows: dict[str, tuple[str, int]]  # order_id -> (status, quantity)
    releases: dict[str, tuple[str, bool]]  # order_id -> (reason, done in Redis)
    dead_lettered: list[str]  # order ids in the dead-letter stream ('' when unreadable)
    stream_len: int
    xpending: int
    pending: int
    available: int | None
    stock: int
    sold: int
    holds: int
    ledger: dict[str, Any]

    @property
    def holding_qty(self) -> int:
        return sum(q for s, q in self.rows.values() if s in HOLDING)

    def status_counts(self) -> dict[str, int]:
        return dict(Counter(s for s, _ in self.rows.values()))

    @property
    def drained(self) -> bool:
        return self.stream_len == 0 and self.xpending == 0 and self.pending == 0


async def audit(b: Backends, sale_id: str) -> Audit:
    k = b.keys(sale_id)
    rows = await b.pg.fetch(
        "SELECT order_id, status, quantity FROM orders WHERE sale_id = $1", sale_id
    )
    rel = await b.pg.fetch(
        "SELECT order_id, reason, redis_released_at IS NOT NULL AS done FROM releases "
        "WHERE sale_id = $1", sale_id,
    )
    sale = await b.pg.fetchrow("SELECT stock, sold FROM sales WHERE sale_id = $1", sale_id)
    assert sale is not None
    dlq: Any = await b.redis.xrange(k.dlq)
    stream_len = int(await b.redis.xlen(k.stream))
    try:
        summary: Any = await b.redis.xpending(k.stream, b.settings.consumer_group)
        xpending = int(summary["pending"])
    except Exception:  # no stream / group (Redis lost it)
        xpending = 0
    available, pending = await b.redis.hmget(k.sale, "available", "pending")
    return Audit(
        rows={r["order_id"]: (r["status"], int(r["quantity"])) for r in rows},
        releases={r["order_id"]: (r["reason"], bool(r["done"])) for r in rel},
        dead_lettered=[_text(f.get(b"o", b"")) for _id, f in dlq],
        stream_len=stream_len, xpending=xpending,
        pending=int(pending or 0), available=int(available) if available is not None else None,
        stock=int(sale["stock"]), sold=int(sale["sold"]),
        holds=int(await b.redis.hlen(k.holds)),
        ledger=await ledger(b, sale_id),
    )


async def wait_drained(b: Backends, sale_id: str, timeout_s: float = 60.0) -> float:
    """Seconds until the sale's stream, pending list and pending counter are empty."""
    k = b.keys(sale_id)
    started = time.monotonic()
    while True:
        length = int(await b.redis.xlen(k.stream))
        summary: Any = await b.redis.xpending(k.stream, b.settings.consumer_group)
        pending = await b.redis.hget(k.sale, "pending")
        if length == 0 and int(summary["pending"]) == 0 and int(pending or 0) == 0:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(
                f"not drained in {timeout_s}s: xlen={length} xpending={summary['pending']} "
                f"pending={pending!r}"
            )
        await asyncio.sleep(0.05)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
