"""Holds of 1 s expire within 2 s of ``expires_at``, and return stock once.

1. Consumer and compensator running (in-process, as ``flashsale up`` runs
   them), under load on another sale: every order becomes ``expired``; the lag
   from ``expires_at`` to the status observed in PostgreSQL is measured.
2. Consumer NOT running: the orders are still pending in Redis; the
   compensator's ``expire_unpersisted`` expires them from the stream. Starting
   the consumer afterwards does not resurrect them.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import datetime

import pytest

from flashsale.config import Settings
from flashsale.core.backends import Backends
from flashsale.web.app import Workers
from tests.chaos.conftest import Figures
from tests.chaos.harness import LoadGenerator, Request, audit, burst, wait_drained
from tests.support import Api, eventually, running_app

ORDERS = 20
STOCK = 50
LAG_MAX_S = 2.0

pytestmark = pytest.mark.chaos


async def _watch_expiry(
    b: Backends, sale_id: str, n: int, timeout_s: float = 10.0
) -> dict[str, tuple[float, float]]:
    """order id -> (lag observed by polling every 20 ms, lag by the row's updated_at)."""
    seen: dict[str, tuple[float, float]] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < n and time.monotonic() < deadline:
        rows = await b.pg.fetch(
            "SELECT order_id, expires_at, updated_at FROM orders "
            "WHERE sale_id = $1 AND status = 'expired'", sale_id,
        )
        now = time.time()
        for r in rows:
            if r["order_id"] not in seen:
                expires: datetime = r["expires_at"]
                seen[r["order_id"]] = (
                    now - expires.timestamp(), (r["updated_at"] - expires).total_seconds(),
                )
        await asyncio.sleep(0.02)
    return seen


async def _releases_done(b: Backends, sale_id: str) -> bool:
    """Every release committed in PostgreSQL has been carried out in Redis."""
    n = await b.pg.fetchval(
        "SELECT count(*) FROM releases WHERE sale_id = $1 AND redis_released_at IS NULL", sale_id
    )
    return int(n) == 0


async def _statuses(api: Api, orders: dict[str, Request]) -> set[str]:
    out = set()
    for oid, req in orders.items():
        status, body, _ = await api.request(
            "GET", f"/api/v1/orders/{oid}", headers=api.buyer(req.user)
        )
        assert status == 200, body
        out.add(body["status"])
    return out


def _lags(seen: dict[str, tuple[float, float]]) -> dict[str, float]:
    observed = [o for o, _u in seen.values()]
    server = [u for _o, u in seen.values()]
    return {
        "observed_max_s": round(max(observed), 3),
        "observed_p50_s": round(statistics.median(observed), 3),
        "server_max_s": round(max(server), 3),
    }


async def _reserve(api: Api, sid: str, prefix: str, n: int) -> dict[str, Request]:
    reqs = [Request(f"{prefix}-{i}", f"{prefix}-k{i}", 1) for i in range(n)]
    results = await burst(api.base, sid, reqs)
    assert all(s == 202 for _r, s, _b in results), results[:3]
    return {str(body["order_id"]): r for r, _s, body in results}


async def test_hold_expires_within_2s_under_load(
    chaos_settings: Settings, direct: Backends, figures: Figures
) -> None:
    async with running_app(chaos_settings, Workers(consumer=True, compensator=True)) as api:
        busy = (await api.create_sale(stock=100_000, per_user_limit=1000, hold_seconds=3600))[
            "sale_id"
        ]
        sid = (await api.create_sale(stock=STOCK, per_user_limit=5, hold_seconds=1))["sale_id"]
        load = LoadGenerator(api.base, busy, rate_per_s=100, users=300, user_prefix="busy")
        stop = asyncio.Event()
        load_task = asyncio.create_task(load.run(stop))
        await asyncio.sleep(0.5)
        orders = await _reserve(api, sid, "buyer", ORDERS)
        seen = await _watch_expiry(direct, sid, ORDERS)
        stop.set()
        await load_task
        assert await _statuses(api, orders) == {"expired"}
        await wait_drained(direct, sid)
        await eventually(lambda: _releases_done(direct, sid), timeout_s=5)
        a = await audit(direct, sid)

    lags = _lags(seen) if seen else {}
    figures.update(
        orders=ORDERS, expired=len(seen), lag=lags, background_load=load.stats.figures(),
        releases=len(a.releases), ledger=a.ledger,
    )
    print(f"\nexpiry under load: {len(seen)}/{ORDERS} expired, lag {lags}")
    assert len(seen) == ORDERS
    assert lags["observed_max_s"] <= LAG_MAX_S, lags
    assert set(a.releases) == set(orders)
    assert {r for r, _done in a.releases.values()} == {"expired"}
    assert all(done for _r, done in a.releases.values())
    assert a.available == STOCK and a.holds == 0, "stock not back exactly once"
    assert a.sold == 0
    assert a.ledger["consistent"] is True, a.ledger


async def test_unpersisted_hold_expires_and_is_not_resurrected(
    chaos_settings: Settings, direct: Backends, figures: Figures
) -> None:
    async with running_app(chaos_settings, Workers(compensator=True)) as api:  # no consumer
        sid = (await api.create_sale(stock=10, per_user_limit=5, hold_seconds=1))["sale_id"]
        orders = await _reserve(api, sid, "buyer", 5)
        seen = await _watch_expiry(direct, sid, 5)
        before = await audit(direct, sid)
        assert await _statuses(api, orders) == {"expired"}

    # the consumer comes back and finds the expired orders still in the stream
    async with running_app(chaos_settings) as api:
        await api.drain(sid)
        assert await _statuses(api, orders) == {"expired"}
        after = await audit(direct, sid)

    lags = _lags(seen) if seen else {}
    figures.update(
        orders=5, expired=len(seen), lag=lags, stream_before_consumer=before.stream_len,
        available_before_consumer=before.available, ledger_after_consumer=after.ledger,
    )
    print(f"\nunpersisted expiry: {len(seen)}/5 expired by the compensator, lag {lags}; "
          f"after the consumer ran: {after.status_counts()}")
    assert len(seen) == 5 and lags["observed_max_s"] <= LAG_MAX_S, lags
    assert before.stream_len == 5, "the consumer was not supposed to run"
    assert before.available == 10, "the holds were not returned in Redis"
    assert after.status_counts() == {"expired": 5}, "an expired order was resurrected"
    assert after.sold == 0 and after.drained and after.holds == 0
    assert after.available == 10
    assert after.ledger["consistent"] is True, after.ledger
