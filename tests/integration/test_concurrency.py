"""2,000 concurrent reservations on 200 units: never oversell, one order per key."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from aiohttp import ClientSession, TCPConnector

from tests.support import Api

STOCK = 200
BUYERS = 1500
FRESH = 1600
REPLAYS = 400


async def test_spike_sells_exactly_the_stock(api: Api) -> None:
    sid = (await api.create_sale(stock=STOCK, per_user_limit=2))["sale_id"]
    rnd = random.Random(7)
    buyers = [f"buyer-{i}" for i in range(BUYERS)]
    fresh = [(rnd.choice(buyers), f"key-{i}") for i in range(FRESH)]
    replays = [rnd.choice(fresh) for _ in range(REPLAYS)]
    calls = fresh + replays
    rnd.shuffle(calls)
    headers = {u: api.buyer(u) for u in buyers}

    async with ClientSession(connector=TCPConnector(limit=256)) as session:

        async def one(user: str, key: str) -> tuple[str, str, int, dict[str, object]]:
            url = f"{api.base}/api/v1/sales/{sid}/orders"
            h = {**headers[user], "Idempotency-Key": key, "Content-Type": "application/json"}
            async with session.post(url, data=b'{"quantity": 1}', headers=h) as r:
                return user, key, r.status, await r.json()

        results = await asyncio.gather(*(one(u, k) for u, k in calls))

    statuses = Counter(status for _, _, status, _ in results)
    assert set(statuses) <= {202, 409}, statuses
    orders_by_key: dict[tuple[str, str], set[str]] = {}
    for user, key, status, body in results:
        if status == 202:
            orders_by_key.setdefault((user, key), set()).add(str(body["order_id"]))
    assert all(len(ids) == 1 for ids in orders_by_key.values()), "a key produced two orders"
    accepted = {next(iter(ids)) for ids in orders_by_key.values()}
    assert len(accepted) == STOCK, (len(accepted), statuses)
    # a replayed key answers exactly what its first call answered
    first: dict[tuple[str, str], tuple[int, object]] = {}
    for user, key, status, body in results:
        got = (status, body.get("order_id") or body.get("error"))
        assert first.setdefault((user, key), got) == got

    await api.drain(sid)
    rows = await api.backends.pg.fetch(
        "SELECT order_id, count(*) AS n FROM orders WHERE sale_id = $1 GROUP BY order_id", sid
    )
    assert {r["order_id"] for r in rows} == accepted
    assert all(r["n"] == 1 for r in rows)
    led = await api.ledger(sid)
    assert led["consistent"] is True
    assert led["available"] == 0 and led["pending"] == 0 and led["awaiting_payment"] == STOCK
    per_user = await api.backends.pg.fetch(
        "SELECT user_id, sum(quantity) AS q FROM orders WHERE sale_id = $1 GROUP BY user_id", sid
    )
    assert max(r["q"] for r in per_user) <= 2
    print(f"\nconcurrency: {len(calls)} requests, statuses {dict(statuses)}, "
          f"accepted {len(accepted)}, persisted {len(rows)}, ledger {led}")
