"""The price of a zero loss window: Redis AOF ``appendfsync always`` vs ``everysec``.

README's loss window: with ``everysec`` (the embedded default) a crash of the
MACHINE loses up to about a second of accepted, not yet persisted
reservations; ``appendfsync always`` makes it zero at the cost of an fsync
per write. This measures that cost on this machine's disk: the same HTTP
front (in-process) against a dedicated redis-server child with each policy,
(1) a burst of 4,000 reservations at 200 concurrent buyers (the front
coalesces them into few script calls, so few fsyncs) and (2) 300
reservations one after another (one script call, so one fsync, each).

Checked: each run accepts every key exactly once (holds = accepted).
Figures: throughput and latency for each policy, and the ratios.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from flashsale.config import Settings
from tests.chaos.conftest import Figures
from tests.chaos.faultkit import Buy, Buyers, DurableRedis, ms, percentile
from tests.support import running_app

pytestmark = pytest.mark.chaos

BURST = 4000
CONCURRENCY = 200
SEQUENTIAL = 300


async def _measure(settings: Settings, tmp: Path, fsync: str) -> dict[str, Any]:
    redis = DurableRedis(tmp / f"redis-{fsync}", persistent=True, appendfsync=fsync)
    redis.start()
    try:
        s = replace(settings, redis_url=redis.url)
        async with running_app(s) as api:
            sid = (await api.create_sale(stock=BURST + SEQUENTIAL, per_user_limit=10))[
                "sale_id"
            ]
            async with Buyers(api.base, sid, concurrency=CONCURRENCY) as burst:
                started = time.monotonic()
                await burst.burst(Buy(f"b-{i % 1000}", f"{fsync}-b-{i}") for i in range(BURST))
                burst_s = time.monotonic() - started
            async with Buyers(api.base, sid, concurrency=1) as seq:
                started = time.monotonic()
                for i in range(SEQUENTIAL):
                    await seq.buy(Buy(f"s-{i % 100}", f"{fsync}-s-{i}"))
                seq_s = time.monotonic() - started
            holds = int(await api.backends.redis.hlen(api.backends.keys(sid).holds))
    finally:
        redis.kill9()
    b_lat = [a.latency_s for a in burst.all_attempts()]
    s_lat = [a.latency_s for a in seq.all_attempts()]
    accepted = len(burst.accepted()) + len(seq.accepted())
    assert accepted == BURST + SEQUENTIAL == holds, (fsync, accepted, holds)
    assert burst.statuses() == {"202": BURST} and seq.statuses() == {"202": SEQUENTIAL}
    return {
        "burst_per_s": round(BURST / burst_s), "burst_p50_ms": ms(percentile(b_lat, 50)),
        "burst_p99_ms": ms(percentile(b_lat, 99)),
        "sequential_per_s": round(SEQUENTIAL / seq_s),
        "sequential_p50_ms": ms(percentile(s_lat, 50)),
        "sequential_p99_ms": ms(percentile(s_lat, 99)),
    }


async def test_appendfsync_always_cost(
    chaos_settings: Settings, figures: Figures, tmp_path: Path
) -> None:
    everysec = await _measure(chaos_settings, tmp_path, "everysec")
    always = await _measure(chaos_settings, tmp_path, "always")
    figures.update(
        everysec=everysec, always=always,
        burst_throughput_ratio=round(always["burst_per_s"] / everysec["burst_per_s"], 2),
        sequential_p50_added_ms=round(
            always["sequential_p50_ms"] - everysec["sequential_p50_ms"], 2
        ),
    )
    print(f"\nappendfsync everysec: {everysec}\nappendfsync always:   {always}")
