"""Redis loses everything mid-sale; flashsale rebuilds each sale from PostgreSQL.

A dedicated redis-server child (no persistence) serves this test only: the
machine's shared Redis is never flushed. Mid-sale (orders persisted, some
cancelled, some still pending in the stream, some of those cancelled) it is
killed and started again empty. Then:

* reservations answer 503 ``unavailable`` with Retry-After (never 404/500)
  until the rebuild that the first of them triggered has run;
* the rebuilt ledger is consistent once drained; the loss is exactly the
  accepted orders not yet persisted (the README's stated window without AOF);
* an oversubscribed burst sells exactly the remaining stock (no oversell:
  accepted <= stock, PostgreSQL ``sold`` <= stock);
* a compensator started after a FLUSHALL rebuilds the sale by itself;
* ``flashsale reconcile SALE --repair`` (CLI child) restores a sale whose keys
  were deleted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis

from flashsale.config import Settings
from flashsale.core.backends import Backends, open_backends
from flashsale.core.persist import Persister
from flashsale.ops.metrics import Metrics
from tests.chaos.conftest import Figures
from tests.chaos.harness import (
    HOLDING,
    RedisServer,
    Request,
    Services,
    audit,
    burst,
    flashsale_env,
    run_cli,
    wait_drained,
)
from tests.support import Api, eventually, running_app

STOCK = 300
LIMIT = 2

pytestmark = pytest.mark.chaos


class Consumer:
    """An in-process consumer loop the test starts and stops."""

    def __init__(self, b: Backends) -> None:
        self.b = b
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(Persister(self.b, Metrics()).run(self._stop))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


def _reqs(prefix: str, n: int) -> list[Request]:
    return [Request(f"{prefix}-{i}", f"{prefix}-key-{i}", 1) for i in range(n)]


async def _accept_all(api: Api, sid: str, reqs: list[Request]) -> dict[str, Request]:
    results = await burst(api.base, sid, reqs)
    assert Counter(s for _r, s, _b in results) == {202: len(reqs)}, results[:3]
    return {str(b["order_id"]): r for r, _s, b in results}


async def _cancel(api: Api, orders: dict[str, Request]) -> None:
    for oid, req in orders.items():
        status, body, _ = await api.request(
            "POST", f"/api/v1/orders/{oid}/cancel", headers=api.buyer(req.user)
        )
        assert status == 200 and body["status"] == "cancelled", body


async def test_redis_restarted_empty_mid_sale(
    chaos_settings: Settings, services: Services, figures: Figures,
    tmp_path: Path,
) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        settings = replace(chaos_settings, redis_url=redis.url)
        async with open_backends(settings) as b, running_app(settings) as api:
            await _scenario(b, api, redis, settings, services, figures, tmp_path)
    finally:
        redis.kill9()


async def _scenario(
    b: Backends, api: Api, redis: RedisServer, settings: Settings, services: Services,
    figures: Figures, tmp_path: Path,
) -> None:
    sid = (await api.create_sale(stock=STOCK, per_user_limit=LIMIT, hold_seconds=600))["sale_id"]
    k = b.keys(sid)
    consumer = Consumer(b)

    # -- mid-sale: persisted, cancelled, pending, pending-cancelled ------------
    persisted = await _accept_all(api, sid, _reqs("early", 150))
    consumer.start()
    await wait_drained(b, sid, timeout_s=30)
    await consumer.stop()
    cancelled = dict(list(persisted.items())[:20])
    await _cancel(api, cancelled)
    pending = await _accept_all(api, sid, _reqs("late", 30))
    pending_cancelled = dict(list(pending.items())[:5])
    await _cancel(api, pending_cancelled)
    unpersisted = {o: r for o, r in pending.items() if o not in pending_cancelled}
    assert int(await b.redis.xlen(k.stream)) == len(pending)

    # -- Redis restarts empty ----------------------------------------------------
    redis.restart_empty()
    lost_at = time.monotonic()
    assert isinstance(b.redis, Redis)  # a standalone server, ours
    await b.redis.connection_pool.disconnect()  # the test's own links died with the server
    await api.request("GET", "/readyz")  # the front reconnects (its old links are dead)
    probe = await burst(api.base, sid, _reqs("probe", 20))
    probe_statuses = Counter(s for _r, s, _b in probe)
    codes = Counter(str(b_.get("error", {}).get("code")) for _r, s, b_ in probe if s != 202)
    assert set(probe_statuses) <= {202, 503}, probe_statuses
    assert probe_statuses[503] >= 1, "no reservation saw the sale missing"
    assert set(codes) == {"unavailable"}, codes
    assert all(b_.get("retry_after") for _r, s, b_ in probe if s == 503)
    # retried, the same requests are accepted once the rebuild has run
    retried: dict[str, Request] = {str(b_["order_id"]): r for r, s, b_ in probe if s == 202}
    todo = [r for r, s, _b in probe if s == 503]
    attempts = 0
    while todo:
        attempts += 1
        assert attempts < 100, "the sale was never rebuilt"
        await asyncio.sleep(0.05)
        results = await burst(api.base, sid, todo)
        assert {s for _r, s, _b in results} <= {202, 503}
        retried.update({str(b_["order_id"]): r for r, s, b_ in results if s == 202})
        todo = [r for r, s, _b in results if s == 503]
    rebuilt_s = time.monotonic() - lost_at

    consumer.start()
    await wait_drained(b, sid, timeout_s=30)
    after_loss = await audit(b, sid)
    rows_lost = [o for o in unpersisted if o in after_loss.rows]
    assert rows_lost == [], "an unpersisted order reappeared"
    for oid, req in list(unpersisted.items())[:3]:  # lost: the stated window without AOF
        status, _body, _ = await api.request(
            "GET", f"/api/v1/orders/{oid}", headers=api.buyer(req.user)
        )
        assert status == 404
    for oid in persisted:
        expected = "cancelled" if oid in cancelled else "awaiting_payment"
        assert after_loss.rows[oid][0] == expected
    for oid in pending_cancelled:
        assert after_loss.rows[oid][0] == "cancelled"
    assert after_loss.ledger["consistent"] is True, after_loss.ledger
    assert after_loss.available == STOCK - after_loss.holding_qty

    # -- an oversubscribed burst sells exactly what remains ----------------------
    remaining = after_loss.available
    assert remaining is not None and remaining > 0
    results = await burst(api.base, sid, _reqs("rush", remaining * 3))
    rush = Counter(s for _r, s, _b in results)
    assert set(rush) <= {202, 409}, rush
    assert rush[202] == remaining, (rush, remaining)
    await wait_drained(b, sid, timeout_s=30)
    sold_out = await audit(b, sid)
    assert sold_out.sold == sold_out.holding_qty == STOCK
    assert sold_out.available == 0
    assert sold_out.ledger["consistent"] is True, sold_out.ledger
    await consumer.stop()

    # -- FLUSHALL; a compensator started now rebuilds the sale by itself ---------
    back = dict(list(retried.items())[:3])
    await _cancel(api, back)  # 3 units back on sale
    await b.redis.flushall()
    comp = services.add("compensate", flashsale_env(settings, tmp_path))
    comp.start()
    started = time.monotonic()
    await eventually(lambda: b.redis.exists(k.sale), timeout_s=20)
    comp_rebuild_s = time.monotonic() - started
    assert await comp.stop() == 0, comp.log_tail()
    after_flush = await audit(b, sid)
    assert after_flush.available == 3
    assert after_flush.ledger["consistent"] is True, after_flush.ledger

    # -- keys deleted; reconcile --repair (CLI) restores them ----------------------
    await b.redis.delete(*k.all_sale_keys())
    env = flashsale_env(settings, tmp_path)
    code, out = await run_cli(env, "reconcile", sid)
    assert code == 1 and json.loads(out)["consistent"] is False
    code, out = await run_cli(env, "reconcile", sid, "--repair")
    repaired = json.loads(out)
    assert code == 0 and repaired["consistent"] is True, repaired
    assert repaired["available"] == 3
    again = await burst(api.base, sid, _reqs("after-repair", 5))
    assert Counter(s for _r, s, _b in again) == {202: 3, 409: 2}
    final = await audit(b, sid)
    assert final.sold <= final.stock

    figures.update(
        persisted_before=len(persisted), cancelled_before=len(cancelled),
        pending_at_loss=len(pending), pending_cancelled=len(pending_cancelled),
        lost_in_window=len(unpersisted), probe_statuses=dict(probe_statuses),
        unavailable_until_rebuilt_s=round(rebuilt_s, 3), probe_retry_rounds=attempts,
        ledger_after_rebuild=after_loss.ledger, rush_requests=remaining * 3,
        rush_accepted=rush[202], remaining_before_rush=remaining,
        sold_after_rush=sold_out.sold, compensator_start_rebuild_s=round(comp_rebuild_s, 2),
        reconcile_repair=repaired,
        statuses_by_holding={s: sum(1 for x, _q in final.rows.values() if x == s)
                             for s in (*HOLDING, "cancelled")},
    )
    print(f"\nredis loss: lost window {len(unpersisted)} (unpersisted), "
          f"probe {dict(probe_statuses)}, rebuilt after {rebuilt_s:.3f}s, "
          f"rush {remaining * 3} -> {rush[202]} accepted of {remaining}, "
          f"compensator rebuild {comp_rebuild_s:.2f}s")
