"""Reservations per second by outcome and latency quantiles, across fronts.

Each front process adds, once a second, what its Metrics counted since the
last flush (reservations by outcome, the latency histogram's buckets) to a
Redis hash per second, ``<p>:stats:<unix second>`` (fields ``o:<outcome>``
and ``b:<bucket index>``, cumulative over the buckets as Prometheus keeps
them), kept BUCKET_TTL_S. Summing the hashes of all fronts gives the
service's rates and, interpolated as PromQL's histogram_quantile does, its
p50/p99 per second. The reservation path is untouched: one pipeline a
second per process. Readers cache the seconds that can no longer change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from flashsale.core.clients import as_text
from flashsale.ops.metrics import LATENCY_BUCKETS_S, Metrics

if TYPE_CHECKING:
    from flashsale.core.backends import Backends

log = logging.getLogger("flashsale.ops.stats")

WINDOW_S = 180  # the dashboard's charts: the last three minutes
BUCKET_TTL_S = 600
SETTLED_AFTER_S = 3  # a second this old has been flushed by every front
UPPER_BOUNDS = (*LATENCY_BUCKETS_S, math.inf)


def stats_key(prefix: str, second: int) -> str:
    return f"{prefix}:stats:{second}"


def _counters(m: Metrics) -> tuple[dict[str, float], list[float]]:
    outcomes: dict[str, float] = {}
    for family in m.reservations.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                outcomes[s.labels["outcome"]] = s.value
    buckets = [0.0] * len(UPPER_BOUNDS)
    for family in m.reserve_latency.collect():
        for s in family.samples:
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                buckets[UPPER_BOUNDS.index(le) if le in UPPER_BOUNDS else -1] = s.value
    return outcomes, buckets


class StatsFlusher:
    """One per front process: adds this process's counts to the shared seconds."""

    def __init__(self, backends: Backends, metrics: Metrics) -> None:
        self._b = backends
        self._m = metrics
        self._outcomes, self._buckets = _counters(metrics)

    async def flush(self, second: int | None = None) -> None:
        outcomes, buckets = _counters(self._m)
        fields: dict[str, int] = {}
        for outcome, v in outcomes.items():
            d = int(v - self._outcomes.get(outcome, 0.0))
            if d:
                fields[f"o:{outcome}"] = d
        for i, v in enumerate(buckets):
            d = int(v - self._buckets[i])
            if d:
                fields[f"b:{i}"] = d
        self._outcomes, self._buckets = outcomes, buckets
        if not fields:
            return
        sec = int(time.time()) - 1 if second is None else second
        key = stats_key(self._b.settings.key_prefix, sec)
        async with self._b.redis.pipeline(transaction=False) as pipe:
            for f, d in fields.items():
                pipe.hincrby(key, f, d)
            pipe.expire(key, BUCKET_TTL_S)
            await pipe.execute()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # just past each second boundary: the counts of the second that ended
            delay = 1.05 - (time.time() % 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            try:
                await self.flush()
            except (RedisError, OSError) as exc:  # the counts stay for the next flush
                log.debug("stats flush failed: %r", exc)


def quantile(q: float, cumulative: list[int]) -> float | None:
    """PromQL histogram_quantile over one second's cumulative bucket counts."""
    total = cumulative[-1] if cumulative else 0
    if total <= 0:
        return None
    rank = q * total
    prev_count, lower = 0, 0.0
    for upper, count in zip(UPPER_BOUNDS, cumulative, strict=True):
        if count >= rank:
            if math.isinf(upper):
                return LATENCY_BUCKETS_S[-1]
            if count == prev_count:
                return upper
            return lower + (upper - lower) * (rank - prev_count) / (count - prev_count)
        prev_count, lower = count, upper
    return LATENCY_BUCKETS_S[-1]


class SeriesReader:
    """The last WINDOW_S seconds, summed over fronts; settled seconds cached."""

    def __init__(self, backends: Backends) -> None:
        self._b = backends
        self._cache: dict[int, dict[str, int]] = {}

    async def read(self, now_s: int | None = None) -> dict[str, Any]:
        now_s = int(time.time()) if now_s is None else now_s
        last = now_s - 1
        seconds = list(range(last - WINDOW_S + 1, last + 1))
        for s in [s for s in self._cache if s < seconds[0]]:
            del self._cache[s]
        todo = [s for s in seconds if s not in self._cache or s > now_s - SETTLED_AFTER_S]
        prefix = self._b.settings.key_prefix
        async with self._b.redis.pipeline(transaction=False) as pipe:
            for s in todo:
                pipe.hgetall(stats_key(prefix, s))
            got = await pipe.execute()
        for s, raw in zip(todo, got, strict=True):
            self._cache[s] = {as_text(k): int(v) for k, v in raw.items()}
        return series(seconds, [self._cache[s] for s in seconds])


def series(seconds: list[int], rows: list[dict[str, int]]) -> dict[str, Any]:
    names = sorted({k[2:] for r in rows for k in r if k.startswith("o:")})
    outcomes = {n: [r.get(f"o:{n}", 0) for r in rows] for n in names}
    p50: list[float | None] = []
    p99: list[float | None] = []
    for r in rows:
        cum = [r.get(f"b:{i}", 0) for i in range(len(UPPER_BOUNDS))]
        for out, q in ((p50, 0.5), (p99, 0.99)):
            v = quantile(q, cum)
            out.append(None if v is None else round(v * 1000, 3))
    return {"t": seconds, "outcomes": outcomes, "p50_ms": p50, "p99_ms": p99}
