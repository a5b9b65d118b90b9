"""Test support for Redis Sentinel: a topology per test (real redis-server
processes, flashsale/run/embedded/sentinel.py), settings that reach it through
the sentinels, and a load of buyers recorded in a History.

The load: ``clients`` buyers in parallel, each sending reservations with fresh
keys (one request at a time), a 503 / 5xx / transport error retried with the
same key until decided; every attempt is one History operation, so the
checker sees each 503 and whether its retry resolved it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector

from flashsale import auth
from flashsale.config import Settings
from flashsale.run.embedded.sentinel import SentinelTopology
from tests.chaos.history import History, Outcome
from tests.support import JWT_SECRET, test_settings


@contextlib.contextmanager
def sentinel_topology(base_dir: Path, **kwargs: Any) -> Iterator[SentinelTopology]:
    topo = SentinelTopology(base_dir, **kwargs)
    try:
        topo.start()
        yield topo
    finally:
        topo.stop()


def sentinel_settings(
    topo: SentinelTopology, database_url: str, **overrides: Any
) -> Settings:
    """Test settings that find the primary through the topology's sentinels."""
    base = test_settings("", database_url, **overrides)
    return replace(
        base, redis_url=None,
        redis_sentinels=tuple(("127.0.0.1", s.port) for s in topo.sentinels),
        redis_sentinel_master=topo.master_name,
        redis_replica_acks=overrides.get("redis_replica_acks", 1),
    )


def sentinel_env(topo: SentinelTopology, acks: int, timeout_ms: int = 500) -> dict[str, str]:
    """Environment additions for a flashsale child (FLASHSALE_REDIS_URL emptied)."""
    return {
        "FLASHSALE_REDIS_URL": "", **topo.env(),
        "FLASHSALE_REDIS_REPLICA_ACKS": str(acks),
        "FLASHSALE_REDIS_REPLICA_ACK_TIMEOUT_MS": str(timeout_ms),
    }


@dataclass
class KeyedLoad:
    """Buyers with unique keys, retried until decided; all attempts in ``history``."""

    base: str
    sales: Sequence[str]
    clients: int = 8
    users: int = 2000
    pause_s: float = 0.02
    retry_sleep_s: float = 0.1
    timeout_s: float = 8.0
    history: History = field(default_factory=History)
    accepted_at: list[float] = field(default_factory=list)  # monotonic time of each 202
    keys: int = 0
    undecided: int = 0
    resolved_after_503: int = 0  # keys that got a 503 and then a decided answer
    statuses: Counter[str] = field(default_factory=Counter)
    _seq: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def _token(self, user: str) -> str:
        return auth.mint(JWT_SECRET, user, 3600)

    async def _attempt(
        self, s: ClientSession, sale: str, user: str, key: str, token: str
    ) -> Outcome:
        op = self.history.invoke(sale, user, 1, key)
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key,
                   "Content-Type": "application/json"}
        try:
            async with s.post(f"{self.base}/api/v1/sales/{sale}/orders",
                              data=json.dumps({"quantity": 1}), headers=headers) as r:
                body: Any = await r.json(content_type=None)
                self.statuses[str(r.status)] += 1
                outcome = self.history.complete(op, r.status, body)
                if r.status == 202:
                    self.accepted_at.append(time.monotonic())
                return outcome
        except (ClientError, OSError, TimeoutError, ValueError) as exc:
            self.statuses["transport"] += 1
            return self.history.fail(op, exc)

    async def _client(self, s: ClientSession, stop: asyncio.Event, grace: asyncio.Event,
                      rnd: random.Random) -> None:
        while not stop.is_set():
            n = next(self._seq)
            sale = self.sales[n % len(self.sales)]
            user = f"buyer-{rnd.randrange(self.users)}"
            key = f"key-{n}"
            token = self._token(user)
            self.keys += 1
            saw_503 = False
            while True:
                outcome = await self._attempt(s, sale, user, key, token)
                last = self.history.ops[max(self.history.ops)]
                reply = last.reply
                decided = outcome is Outcome.OK or (
                    outcome is Outcome.FAILED and reply is not None
                    and reply.status not in (429, 503))
                if decided:
                    self.resolved_after_503 += saw_503
                    break
                saw_503 = True
                if grace.is_set():  # stopped and the grace is over: leave it undecided
                    self.undecided += 1
                    break
                await asyncio.sleep(self.retry_sleep_s)
            await asyncio.sleep(self.pause_s)

    async def run(self, stop: asyncio.Event, grace: asyncio.Event, seed: int = 1) -> None:
        conn = TCPConnector(limit=self.clients * 2)
        async with ClientSession(connector=conn,
                                 timeout=ClientTimeout(total=self.timeout_s)) as s:
            await asyncio.gather(*(
                self._client(s, stop, grace, random.Random(seed * 1000 + i))
                for i in range(self.clients)
            ))

    def first_accept_after(self, t: float) -> float | None:
        """Seconds from ``t`` to the first 202 of a request sent after ``t``
        (answers to requests already in flight at ``t`` do not count)."""
        later = [o.completed_at for o in list(self.history.ops.values())
                 if o.outcome is Outcome.OK and o.invoked_at > t and o.completed_at is not None]
        return min(later) - t if later else None
