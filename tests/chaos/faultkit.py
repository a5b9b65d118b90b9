"""Shared tools of the fault-injection tests (issue 6): a buyer client that
records every attempt and retries with the same Idempotency-Key until the
outcome is decided, latency percentiles, a dedicated redis-server that keeps
its data across a restart, and the per-key audit (one order per key).

History vocabulary (as in a Jepsen-style history): each attempt is *ok*
(202), *failed* (a decided refusal: 409/422/4xx) or *unknown* (503, 429, a
transport error or a client timeout: the reservation may or may not have
run). A key is *resolved* once an attempt is ok or failed; an unknown
attempt is retried with the same key, which is safe by the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector

from flashsale import auth
from flashsale.core.backends import Backends
from flashsale.core.ledger import ledger
from flashsale.core.persist import Persister
from flashsale.ops.metrics import Metrics
from tests.chaos.harness import RedisServer, paced, wait_drained
from tests.chaos.history import History
from tests.support import JWT_SECRET

DECIDED = frozenset({202, 400, 404, 409, 422})


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


@dataclass(frozen=True)
class Buy:
    user: str
    key: str  # the Idempotency-Key; with send_key False only a name in the records
    quantity: int = 1
    send_key: bool = True  # False: no Idempotency-Key header, sent once, never retried


@dataclass
class Attempt:
    started: float  # time.time() when sent
    latency_s: float
    status: int | str  # HTTP status, or "transport" / "timeout"
    code: str = ""  # the contract error code (non-2xx)
    retry_after: str | None = None
    order_id: str = ""

    @property
    def kind(self) -> str:
        if self.status == 202:
            return "ok"
        if isinstance(self.status, int) and self.status in DECIDED:
            return "failed"
        return "unknown"


@dataclass
class KeyHistory:
    buy: Buy
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def final(self) -> Attempt | None:
        """The deciding attempt (ok or failed), None while unresolved."""
        for a in self.attempts:
            if a.kind != "unknown":
                return a
        return None

    @property
    def order_ids(self) -> set[str]:
        return {a.order_id for a in self.attempts if a.order_id}


class Buyers:
    """Sends reservations and records each attempt; an unknown outcome is
    retried with the same key (after ``retry_sleep_s``, or Retry-After when
    ``honor_retry_after``) until decided or ``give_up_at`` (monotonic)."""

    def __init__(
        self, base: str, sale_id: str, *, concurrency: int = 64, timeout_s: float = 30.0,
        retry_sleep_s: float = 0.05, honor_retry_after: bool = False,
    ) -> None:
        self.base = base
        self.sale_id = sale_id
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retry_sleep_s = retry_sleep_s
        self.honor_retry_after = honor_retry_after
        self.keys: dict[str, KeyHistory] = {}
        self._tokens: dict[str, str] = {}
        self._session: ClientSession | None = None
        self.give_up_at = math.inf
        self.history: History | None = None  # tests/chaos/history.py, when given

    async def __aenter__(self) -> Self:
        self._session = ClientSession(
            connector=TCPConnector(limit=self.concurrency, force_close=False),
            timeout=ClientTimeout(total=self.timeout_s),
        )
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def token(self, user: str) -> str:
        tok = self._tokens.get(user)
        if tok is None:
            tok = self._tokens[user] = auth.mint(JWT_SECRET, user, 3600)
        return tok

    async def attempt(self, buy: Buy) -> Attempt:
        assert self._session is not None
        url = f"{self.base}/api/v1/sales/{self.sale_id}/orders"
        headers = {
            "Authorization": f"Bearer {self.token(buy.user)}", "Content-Type": "application/json",
        }
        if buy.send_key:
            headers["Idempotency-Key"] = buy.key
        body = json.dumps({"quantity": buy.quantity}).encode()
        op = None
        if self.history is not None:
            op = self.history.invoke(
                self.sale_id, buy.user, buy.quantity, buy.key if buy.send_key else None
            )
        wall, started = time.time(), time.monotonic()
        try:
            async with self._session.post(url, data=body, headers=headers) as r:
                raw = await r.read()
                latency = time.monotonic() - started
                parsed: Any = {}
                with contextlib.suppress(ValueError):
                    parsed = json.loads(raw)
                if op is not None and self.history is not None:
                    self.history.complete(op, r.status, parsed)
                a = Attempt(wall, latency, r.status, retry_after=r.headers.get("Retry-After"))
                if r.status == 202:
                    a.order_id = str(parsed["order_id"])
                elif isinstance(parsed, dict):
                    a.code = str(parsed.get("error", {}).get("code", ""))
                return a
        except (TimeoutError, ClientError, OSError) as exc:  # refused, reset, disconnected...
            if op is not None and self.history is not None:
                self.history.fail(op, exc)
            if isinstance(exc, TimeoutError):
                return Attempt(wall, time.monotonic() - started, "timeout")
            return Attempt(wall, time.monotonic() - started, "transport", type(exc).__name__)

    async def buy(self, buy: Buy) -> KeyHistory:
        """One key, retried until decided (or given up)."""
        h = self.keys.setdefault(buy.key, KeyHistory(buy))
        while True:
            a = await self.attempt(buy)
            h.attempts.append(a)
            if a.kind != "unknown" or not buy.send_key or time.monotonic() >= self.give_up_at:
                return h
            pause = self.retry_sleep_s
            if self.honor_retry_after and a.retry_after and a.retry_after.isdigit():
                pause = max(pause, float(a.retry_after))
            await asyncio.sleep(pause)

    async def burst(self, buys: Iterable[Buy]) -> None:
        """Every buy concurrently (bounded by ``concurrency``), each until decided."""
        sem = asyncio.Semaphore(self.concurrency)

        async def one(b: Buy) -> None:
            async with sem:
                await self.buy(b)

        await asyncio.gather(*(one(b) for b in buys))

    async def paced(self, buys: Iterable[Buy], rate_per_s: float, stop: asyncio.Event) -> int:
        """Start buys at ``rate_per_s`` until ``stop``; wait for the started ones."""
        jobs = (functools.partial(self.buy, b) for b in buys)
        return await paced(jobs, rate_per_s, self.concurrency, stop)

    # -- figures --------------------------------------------------------------

    def all_attempts(self) -> list[Attempt]:
        return [a for h in self.keys.values() for a in h.attempts]

    def statuses(self) -> dict[str, int]:
        c: Counter[str] = Counter()
        for a in self.all_attempts():
            c[f"{a.status}:{a.code}" if a.code else str(a.status)] += 1
        return dict(sorted(c.items()))

    def count(self, prefix: str) -> int:
        """Attempts whose ``status[:code]`` starts with ``prefix`` ("503", "transport")."""
        return sum(n for k, n in self.statuses().items() if k.startswith(prefix))

    def accepted(self) -> dict[str, KeyHistory]:
        """order id -> the key that got it (first ok attempt)."""
        out: dict[str, KeyHistory] = {}
        for h in self.keys.values():
            f = h.final
            if f is not None and f.status == 202:
                out[f.order_id] = h
        return out

    def unresolved(self) -> list[str]:
        """Keys (sent with the header) that never got a decided answer."""
        return [k for k, h in self.keys.items() if h.final is None and h.buy.send_key]

    def mismatched(self) -> list[str]:
        """Keys answered 202 with more than one order id (a replay must be the same)."""
        return [k for k, h in self.keys.items() if len(h.order_ids) > 1]

    def missing_retry_after(self) -> int:
        return sum(
            1 for a in self.all_attempts()
            if a.status in (429, 503) and not (a.retry_after and a.retry_after.isdigit())
        )

    def server_errors_not_503(self) -> int:
        return sum(
            1 for a in self.all_attempts()
            if isinstance(a.status, int) and a.status >= 500 and a.status != 503
        )


# ---------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------


class DurableRedis(RedisServer):
    """A dedicated redis-server child (never the machine's shared one) with an
    AOF fsynced on every write: a restart keeps every acknowledged write and
    comes back with an EMPTY script cache (NOSCRIPT for every EVALSHA)."""

    start_timeout_s = 15.0

    def __init__(
        self, data_dir: Path, *, persistent: bool = True, appendfsync: str = "always"
    ) -> None:
        super().__init__(data_dir)
        self.persistent = persistent
        self.appendfsync = appendfsync

    def persistence_args(self) -> list[str]:
        if not self.persistent:
            return super().persistence_args()
        return ["--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", ""]

    def restart(self) -> float:
        """kill -9 and start again on the same port; seconds it was down."""
        started = time.monotonic()
        self.kill9()
        self.start()
        self.restarts += 1
        return time.monotonic() - started


async def wait_http(url: str, timeout_s: float = 20.0) -> float:
    """Seconds until GET ``url`` answers 200."""
    started = time.monotonic()
    async with ClientSession(timeout=ClientTimeout(total=2)) as s:
        while True:
            with contextlib.suppress(ClientError, OSError, TimeoutError):
                async with s.get(url) as r:
                    if r.status == 200:
                        return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"{url} did not answer 200 in {timeout_s}s")
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------
# audits
# ---------------------------------------------------------------------------


@dataclass
class DirectReader:
    """A history Reader (tests/chaos/history.py) on the test's own connections."""

    backends: Backends

    async def ledger(self, sale_id: str) -> dict[str, Any]:
        return await ledger(self.backends, sale_id)


async def drain(b: Backends, sale_id: str, timeout_s: float = 60.0) -> float:
    """Persist everything the sale's stream holds with an in-test consumer."""
    persister = Persister(b, Metrics(), name="faults-drain")
    stop = asyncio.Event()
    task = asyncio.create_task(persister.run(stop))
    try:
        return await wait_drained(b, sale_id, timeout_s=timeout_s)
    finally:
        stop.set()
        await task


async def orders_per_key(b: Backends, sale_id: str) -> dict[tuple[str, str], list[str]]:
    """(user, idempotency key) -> order ids in PostgreSQL, every status."""
    rows = await b.pg.fetch(
        "SELECT user_id, idempotency_key, order_id FROM orders WHERE sale_id = $1 "
        "ORDER BY order_id", sale_id,
    )
    out: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        out.setdefault((r["user_id"], r["idempotency_key"] or ""), []).append(r["order_id"])
    return out


async def redis_errorstats(b: Backends) -> dict[str, int]:
    info: Any = await b.redis.info("errorstats")
    return {k.removeprefix("errorstat_"): int(v["count"]) for k, v in info.items()}


async def redis_calls(b: Backends, *commands: str) -> dict[str, int]:
    info: Any = await b.redis.info("commandstats")
    out = {}
    for c in commands:
        stat = info.get(f"cmdstat_{c}")
        out[c] = int(stat["calls"]) if stat else 0
    return out
