"""A rebuild reads PostgreSQL in one snapshot: a restock committed while it
reads is counted once, never lost.

The old rebuild read the sale row (stock) and the restock ids in separate
statements: a restock committed between the two was in the ids (so its Redis
step, guarded by its id, did nothing) but not in the stock, and Redis stayed
short of it for good. The test makes the restock commit between the reads
deterministically with a real PostgreSQL lock: a transaction holds ACCESS
EXCLUSIVE on ``restocks`` (reads of the table wait), the rebuild starts and is
seen waiting for that lock, then the transaction restocks and commits.
"""

from __future__ import annotations

import asyncio

import asyncpg

from flashsale.core import ledger, sales
from tests.support import Api, eventually

RESTOCK = 5


async def _waiting_on_restocks(api: Api) -> bool:
    waiting = await api.backends.pg.fetchval(
        "SELECT count(*) FROM pg_locks WHERE relation = 'restocks'::regclass AND NOT granted"
    )
    return bool(waiting)


async def test_restock_committed_during_a_rebuild_is_not_lost(api: Api) -> None:
    b = api.backends
    sid = (await api.create_sale(stock=10, per_user_limit=5))["sale_id"]
    k = b.keys(sid)
    assert (await api.reserve(sid, "u1", 2))[0] == 202
    await api.drain(sid)
    assert (await api.reserve(sid, "u2", 1))[0] == 202  # pending: only Redis has it
    await b.redis.delete(k.sale)  # Redis lost the sale hash

    assert b.settings.database_url
    conn = await asyncpg.connect(b.settings.database_url)
    rebuild: asyncio.Task[bool] | None = None
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("LOCK TABLE restocks IN ACCESS EXCLUSIVE MODE")
        rebuild = asyncio.create_task(ledger.rebuild(b, sid))
        await eventually(lambda: _waiting_on_restocks(api))
        # the restock's transaction, as sales.restock commits it
        await conn.execute("UPDATE sales SET stock = stock + $2 WHERE sale_id = $1", sid, RESTOCK)
        restock_id = await conn.fetchval(
            "INSERT INTO restocks (sale_id, quantity) VALUES ($1, $2) RETURNING restock_id",
            sid, RESTOCK,
        )
        await tx.commit()
    finally:
        await conn.close()
        if rebuild is not None:
            assert await asyncio.wait_for(rebuild, 30) is True
    # then its Redis step, as sales.restock (or the compensator's sweep) runs it
    await sales.apply_restock(b, sid, int(restock_id), RESTOCK)
    await api.drain(sid)
    figures = await ledger.ledger(b, sid)
    assert await b.redis.hget(k.sale, "stock") == b"15", figures
    assert figures["stock"] == 15 and figures["available"] == 12, figures
    assert figures["consistent"] is True, figures
