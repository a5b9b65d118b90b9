"""Several consumers in one process (persist.run_consumers) drain one sale's
stream together: every accepted order persisted once, one accepted event per
order, entries a dead consumer held reclaimed, the ledger consistent."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from flashsale.core import events, ledger
from flashsale.core.outcomes import Accepted
from flashsale.core.persist import run_consumers
from flashsale.core.reserve import Reserver
from flashsale.ops.metrics import Metrics
from tests.support import eventually, running_app, test_settings

STOCK = 1_500
BUYERS = 1_600
CONSUMERS = 6


async def test_consumers_in_one_process_persist_each_order_once(
    redis_url: str, database_url: str
) -> None:
    settings = test_settings(
        redis_url, database_url, consumer_concurrency=CONSUMERS, consumer_batch_max=40,
        consumer_name="conc",
    )
    async with running_app(settings) as api:
        b = api.backends
        sid = (await api.create_sale(stock=STOCK, per_user_limit=1))["sale_id"]
        reserver = Reserver(b)
        try:
            results = await asyncio.gather(
                *(reserver.reserve(sid, f"buyer-{i}", 1, f"key-{i}") for i in range(BUYERS))
            )
        finally:
            await reserver.close()
        accepted = {r.order_id for r in results if isinstance(r, Accepted)}
        assert len(accepted) == STOCK

        k = b.keys(sid)
        # a consumer that reads a batch and dies: its entries must be reclaimed
        held: Any = await b.redis.xreadgroup(
            settings.consumer_group, "dead", {k.stream: ">"}, count=100
        )
        assert len(held[0][1]) == 100

        stop = asyncio.Event()
        task = asyncio.create_task(run_consumers(b, Metrics(), stop))

        async def drained() -> bool:
            pel = await b.redis.xpending(k.stream, settings.consumer_group)
            return bool(await b.redis.xlen(k.stream) == 0 and pel["pending"] == 0)

        try:
            await eventually(drained, timeout_s=60)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

        rows = await b.pg.fetch(
            "SELECT order_id, count(*) AS n FROM orders WHERE sale_id = $1 GROUP BY order_id",
            sid,
        )
        assert {r["order_id"] for r in rows} == accepted
        assert all(r["n"] == 1 for r in rows)
        assert await b.pg.fetchval("SELECT sold FROM sales WHERE sale_id = $1", sid) == STOCK
        assert await b.redis.hlen(k.pending) == 0
        assert await b.redis.hget(k.sale, "pending") == b"0"
        led = await ledger.ledger(b, sid)
        assert led["consistent"] and led["available"] == 0, led

        names = {c["name"] for c in await b.redis.xinfo_consumers(k.stream, "persist")}
        assert {f"conc-{i}".encode() for i in range(CONSUMERS)} <= names

        stream: Any = await b.redis.xrange(events.stream_key(settings.key_prefix))
        published = Counter(
            f[b"order_id"].decode()
            for _id, f in stream
            if f[b"type"] == b"order_accepted" and f[b"sale_id"].decode() == sid
        )
        assert set(published) == accepted
        assert max(published.values()) == 1
