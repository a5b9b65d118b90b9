"""Redis paused for 10 s (SIGSTOP ... SIGCONT) in the middle of a burst.

A dedicated redis-server child (never the machine's shared one) backs the
HTTP front and its stream consumer (in-process, default ``redis_timeout_s``
2 s, a sale's waiting line bounded at 128). Buyers arrive at a steady rate
with fresh keys and behave like a well-mannered client: a 503 or 429 is
retried with the same key after its ``Retry-After``. Redis is stopped 3 s
into the burst and continued 10 s later.

Checked: no 5xx other than 503, every 503 carries Retry-After, no request
hangs (the waiting line is shorter than one batch, so a request waits for
at most one in-flight call to time out and then for its own: every answer
within 3 x the Redis timeout, far below the client's 30 s), both kinds of shedding
happen (``unavailable``: Redis did not answer; ``overloaded``: the waiting
line was full, nothing reserved), ``/healthz`` keeps answering, every key
resolved with one order per accepted key, accepted <= stock, and the ledger
consistent after the drain. Figures: p50/p99/max latency over the burst and
within the pause, the 503 counts by code.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import ClientSession, ClientTimeout

from flashsale.config import Settings
from flashsale.core.backends import open_backends
from flashsale.web.app import Workers
from tests.chaos.conftest import Figures
from tests.chaos.faultkit import Buy, Buyers, ms, orders_per_key, percentile
from tests.chaos.harness import RedisServer, audit, wait_drained
from tests.support import running_app

pytestmark = pytest.mark.chaos

PAUSE_S = 10.0
BEFORE_S = 3.0
AFTER_S = 3.0
RATE_PER_S = 150
STOCK = 2000
QUEUE_MAX = 128
REDIS_TIMEOUT_S = 2.0
CLIENT_TIMEOUT_S = 30.0


async def _healthz(base: str, stop: asyncio.Event, out: list[float]) -> None:
    async with ClientSession(timeout=ClientTimeout(total=5)) as s:
        while not stop.is_set():
            started = time.monotonic()
            async with s.get(f"{base}/healthz") as r:
                assert r.status == 200
            out.append(time.monotonic() - started)
            await asyncio.sleep(0.2)


async def test_redis_paused_10s_in_a_burst(
    chaos_settings: Settings, figures: Figures, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    assert redis.proc is not None
    s = replace(
        chaos_settings, redis_url=redis.url, redis_timeout_s=REDIS_TIMEOUT_S,
        reserve_queue_max=QUEUE_MAX,
    )
    try:
        async with open_backends(s) as direct, running_app(s, Workers(consumer=True)) as api:
            sid = (await api.create_sale(stock=STOCK, per_user_limit=10, hold_seconds=3600))[
                "sale_id"
            ]
            keys = int(RATE_PER_S * (BEFORE_S + PAUSE_S + AFTER_S))
            buys = [Buy(f"buyer-{i % 1000}", f"p-{i}") for i in range(keys)]
            async with Buyers(
                api.base, sid, concurrency=1024, timeout_s=CLIENT_TIMEOUT_S,
                honor_retry_after=True,
            ) as buyers:
                buyers.give_up_at = time.monotonic() + 120
                stop = asyncio.Event()
                health: list[float] = []
                health_task = asyncio.create_task(_healthz(api.base, stop, health))
                load = asyncio.create_task(buyers.paced(buys, RATE_PER_S, asyncio.Event()))
                await asyncio.sleep(BEFORE_S)
                redis.proc.send_signal(signal.SIGSTOP)
                paused_at = time.time()
                await asyncio.sleep(PAUSE_S)
                redis.proc.send_signal(signal.SIGCONT)
                resumed_at = time.time()
                health_in_pause = list(health)
                await load
                resolved_s = time.time() - resumed_at
                stop.set()
                await health_task
            drain_s = await wait_drained(direct, sid, timeout_s=60)
            a = await audit(direct, sid)
            per_key = await orders_per_key(direct, sid)
            created = {
                r["order_id"]: r["ms"] for r in await direct.pg.fetch(
                    "SELECT order_id, (extract(epoch FROM created_at) * 1000)::bigint AS ms "
                    "FROM orders WHERE sale_id = $1", sid,
                )
            }
    finally:
        if redis.proc.poll() is None:
            redis.proc.send_signal(signal.SIGCONT)
        redis.kill9()

    attempts = buyers.all_attempts()
    lat = [x.latency_s for x in attempts]
    in_pause = [x.latency_s for x in attempts if paused_at <= x.started < resumed_at]
    codes = buyers.statuses()
    accepted = buyers.accepted()
    ran_unseen = sum(
        1 for h in accepted.values()
        if h.final and created.get(h.final.order_id, 1 << 62) < int(h.final.started * 1000)
    )
    multi = [k for k, v in per_key.items() if len(v) > 1]
    # a waiting line shorter than one batch: a request waits at most for one
    # in-flight call to time out, then for its own (plus the loop's lag)
    assert s.reserve_batch_max >= QUEUE_MAX
    bound_s = 3 * REDIS_TIMEOUT_S
    figures.update(
        pause_s=PAUSE_S, keys=len(buys), attempts=len(attempts), statuses=codes,
        server_errors_not_503=buyers.server_errors_not_503(),
        retry_after_missing=buyers.missing_retry_after(),
        client_timeouts=buyers.count("timeout"), transport_errors=buyers.count("transport"),
        p50_ms=ms(percentile(lat, 50)), p99_ms=ms(percentile(lat, 99)),
        max_ms=ms(max(lat)), p99_in_pause_ms=ms(percentile(in_pause, 99)),
        max_in_pause_ms=ms(max(in_pause, default=0.0)), latency_bound_ms=ms(bound_s),
        healthz_max_in_pause_ms=ms(max(health_in_pause, default=0.0)),
        accepted=len(accepted), unresolved=len(buyers.unresolved()),
        reserved_while_client_heard_503=ran_unseen, keys_with_more_than_one_order=len(multi),
        all_resolved_after_resume_s=round(resolved_s, 2), drain_s=round(drain_s, 2),
        ledger=a.ledger,
    )
    print(
        f"\nredis paused {PAUSE_S:.0f}s: {len(attempts)} requests, {codes}; "
        f"p50 {ms(percentile(lat, 50))} ms, p99 {ms(percentile(lat, 99))} ms, "
        f"max {ms(max(lat))} ms (p99 in the pause {ms(percentile(in_pause, 99))} ms); "
        f"5xx other than 503: {buyers.server_errors_not_503()}, "
        f"503 without Retry-After: {buyers.missing_retry_after()}; accepted {len(accepted)}, "
        f"unresolved {len(buyers.unresolved())}, ledger consistent {a.ledger['consistent']}"
    )

    assert buyers.server_errors_not_503() == 0, codes
    assert buyers.missing_retry_after() == 0
    assert buyers.count("timeout") == 0 and buyers.count("transport") == 0, codes
    assert max(lat) < bound_s, f"a request took {max(lat):.1f}s (bound {bound_s:.1f}s)"
    assert codes.get("503:unavailable", 0) > 0 and codes.get("503:overloaded", 0) > 0, codes
    assert set(codes) <= {"202", "409:sold_out", "503:unavailable", "503:overloaded"}, codes
    assert health_in_pause and max(health_in_pause) < 1.0, "the process stopped serving"
    assert buyers.unresolved() == [] and not buyers.mismatched()
    assert not multi
    assert set(a.rows) == set(accepted)
    assert sum(h.buy.quantity for h in accepted.values()) <= STOCK
    assert a.drained
    assert a.ledger["consistent"] is True, a.ledger
