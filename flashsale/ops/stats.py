"""Reservations per second by outcome and latency quantiles, across fronts,
for the whole service and per sale.

Each front process adds, once a second, what its Metrics counted since the
last flush (reservations by outcome, the latency histogram's buckets) to a
Redis hash per second, ``<p>:stats:<unix second>`` (fields ``o:<outcome>``
and ``b:<bucket index>``, cumulative over the buckets as Prometheus keeps
them), and the same per sale from its SaleTally (``s:<sale_id>:o:<outcome>``
and ``s:<sale_id>:b:<bucket index>``, per bucket, not cumulative), kept
BUCKET_TTL_S. Summing the hashes of all fronts gives the rates and,
interpolated as PromQL's histogram_quantile does, the p50/p99 per second.
The reservation path is untouched: one pipeline a second per process.
Readers cache the seconds that can no longer change. Per-sale series are
read for the live sales shown (at most ``live_sales_max``), and sent only for
those with a reservation in the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Iterable
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
        per_sale = self._m.per_sale.take()
        fields = {f"s:{sale_id}:{f}": n for sale_id, c in per_sale.items() for f, n in c.items()}
        for outcome, v in outcomes.items():
            d = int(v - self._outcomes.get(outcome, 0.0))
            if d:
                fields[f"o:{outcome}"] = d
        for i, v in enumerate(buckets):
            d = int(v - self._buckets[i])
            if d:
                fields[f"b:{i}"] = d
        if not fields:
            return
        sec = int(time.time()) - 1 if second is None else second
        key = stats_key(self._b.settings.key_prefix, sec)
        try:
            async with self._b.redis.pipeline(transaction=False) as pipe:
                for f, d in fields.items():
                    pipe.hincrby(key, f, d)
                pipe.expire(key, BUCKET_TTL_S)
                await pipe.execute()
        except BaseException:  # everything counted goes with the next flush
            self._m.per_sale.give_back(per_sale)
            raise
        self._outcomes, self._buckets = outcomes, buckets

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
    """The last WINDOW_S seconds, summed over fronts; settled seconds cached,
    each split by sale ("" for the whole service's fields)."""

    def __init__(self, backends: Backends) -> None:
        self._b = backends
        self._cache: dict[int, dict[str, dict[str, int]]] = {}

    async def read(
        self, now_s: int | None = None, sale_ids: Iterable[str] = ()
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """The service's series, and those of ``sale_ids`` that had a
        reservation in the window (the others are left out)."""
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
            self._cache[s] = by_sale({as_text(k): int(v) for k, v in raw.items()})
        rows = [self._cache[s] for s in seconds]
        per_sale = {}
        for sale_id in sale_ids:
            mine = [r.get(sale_id, {}) for r in rows]
            if any(mine):
                per_sale[sale_id] = series(seconds, mine, cumulative=False)
        return series(seconds, [r.get("", {}) for r in rows]), per_sale


def by_sale(fields: dict[str, int]) -> dict[str, dict[str, int]]:
    """One second's fields by sale: ``s:<sale_id>:<field>`` under the sale id,
    the service's own (``o:``, ``b:``) under ""."""
    out: dict[str, dict[str, int]] = {}
    for k, v in fields.items():
        sale_id, field = k[2:].split(":", 1) if k.startswith("s:") else ("", k)
        out.setdefault(sale_id, {})[field] = v
    return out


def series(seconds: list[int], rows: list[dict[str, int]], *, cumulative: bool = True
           ) -> dict[str, Any]:
    """Per second: the counts by outcome and p50/p99 in ms (None: none that
    second). ``cumulative``: the rows' bucket counts are (else per bucket)."""
    names = sorted({k[2:] for r in rows for k in r if k.startswith("o:")})
    outcomes = {n: [r.get(f"o:{n}", 0) for r in rows] for n in names}
    p50: list[float | None] = []
    p99: list[float | None] = []
    for r in rows:
        cum = [r.get(f"b:{i}", 0) for i in range(len(UPPER_BOUNDS))]
        if not cumulative:
            cum = list(itertools.accumulate(cum))
        for out, q in ((p50, 0.5), (p99, 0.99)):
            v = quantile(q, cum)
            out.append(None if v is None else round(v * 1000, 3))
    return {"t": seconds, "outcomes": outcomes, "p50_ms": p50, "p99_ms": p99}
