"""Mass expiry after a spike: the compensator releases whole batches (one
release call per sale and chunk), each hold exactly once, persisted or not."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from flashsale.core import events, ledger, release
from flashsale.core.compensate import Compensator
from flashsale.core.outcomes import Accepted
from flashsale.core.reserve import Reserver
from flashsale.ops.metrics import Metrics
from tests.support import eventually, running_app, test_settings

PER_SALE = 450
BATCH_MAX = 200


async def test_mass_expiry_releases_each_hold_once(redis_url: str, database_url: str) -> None:
    settings = test_settings(redis_url, database_url, compensator_batch_max=BATCH_MAX)
    async with running_app(settings) as api:
        b = api.backends
        sids = [
            (await api.create_sale(stock=PER_SALE, per_user_limit=3, hold_seconds=1))["sale_id"]
            for _ in range(3)
        ]
        accepted: dict[str, str] = {}

        async def buy(sales: list[str]) -> None:
            reserver = Reserver(b)
            try:
                results = await asyncio.gather(*(
                    reserver.reserve(sid, f"buyer-{i % 150}", 1, f"k-{sid}-{i}")
                    for sid in sales for i in range(PER_SALE)
                ))
            finally:
                await reserver.close()
            accepted.update({r.order_id: r.sale_id for r in results if isinstance(r, Accepted)})

        await buy(sids[:2])
        await api.drain(sids[0])  # a consumer reads every sale's stream: both persisted
        await buy(sids[2:])  # these stay in the stream (the consumer is behind)
        assert len(accepted) == 3 * PER_SALE
        k3 = b.keys(sids[2])
        assert await b.redis.xlen(k3.stream) == PER_SALE

        await asyncio.sleep(1.2)  # every hold is past its expiry
        stop = asyncio.Event()
        task = asyncio.create_task(Compensator(b, Metrics()).run(stop))

        async def all_back() -> bool:
            for sid in sids:
                if await b.redis.hget(b.keys(sid).sale, "available") != str(PER_SALE).encode():
                    return False
            return True

        try:
            await eventually(all_back, timeout_s=30)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

        await api.drain(sids[2])  # the consumer catches up: finds them expired, changes nothing
        # the unpersisted ones were recorded expired by the compensator itself
        detail = await b.pg.fetchval(
            "SELECT count(*) FROM releases WHERE sale_id = $1 AND detail = $2",
            sids[2], "expired before persisted",
        )
        assert detail == PER_SALE
        # a second release of the same orders changes nothing
        again = await release.in_redis(b, list(accepted.items()))
        assert set(again.values()) == {0}

        statuses = Counter(
            r["status"] for r in await b.pg.fetch(
                "SELECT status FROM orders WHERE order_id = ANY($1::text[])", list(accepted)
            )
        )
        assert statuses == {"expired": len(accepted)}, statuses
        open_rows = await b.pg.fetchval(
            "SELECT count(*) FROM releases WHERE order_id = ANY($1::text[]) "
            "AND redis_released_at IS NULL", list(accepted),
        )
        assert open_rows == 0
        for sid in sids:
            k = b.keys(sid)
            assert await b.redis.hlen(k.holds) == 0
            assert await b.redis.hlen(k.users) == 0
            led = await ledger.ledger(b, sid)
            assert led["consistent"] and led["expired"] == PER_SALE, led
        stream: Any = await b.redis.xrange(events.stream_key(settings.key_prefix))
        released = Counter(
            f[b"order_id"].decode() for _id, f in stream if f[b"type"] == b"order_released"
        )
        assert set(released) == set(accepted) and max(released.values()) == 1
        reasons = {f[b"reason"] for _id, f in stream if f[b"type"] == b"order_released"}
        assert reasons == {b"expired"}
