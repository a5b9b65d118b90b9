"""Poison stream entries: dead-lettered, counted, never blocking the others.

* Malformed entries (unparseable fields) are moved to ``<p>:{sale}:dlq`` at
  their first read.
* An entry of a sale PostgreSQL does not know (deleted there after the
  consumer listed the sale) is dead-lettered and its hold returned.
* An accepted reservation whose INSERT fails every time (a buyer id longer
  than the ``orders.user_id`` CHECK allows, reserved through the real script)
  is retried, dead-lettered after ``consumer_max_deliveries`` attempts, and
  its hold returned; good orders read with it, and after it, are persisted
  meanwhile.

Every dead letter is counted in the consumer's ``flashsale_dead_lettered_total``.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace
from typing import Any

import pytest

from flashsale.config import Settings
from flashsale.core.backends import Backends
from flashsale.core.outcomes import Accepted
from flashsale.core.persist import Persister
from flashsale.core.reserve import Reserver
from flashsale.ops.metrics import Metrics
from tests.chaos.conftest import Figures
from tests.chaos.harness import audit
from tests.support import Api, eventually, running_app

MAX_DELIVERIES = 3

pytestmark = pytest.mark.chaos


def _counter(m: Metrics, name: str) -> float:
    found = re.search(rb"^" + name.encode() + rb" (\S+)$", m.render(), re.M)
    assert found, f"{name} missing from the metrics"
    return float(found.group(1))


def _dead_lettered_total(m: Metrics) -> float:
    return _counter(m, "flashsale_dead_lettered_total")


async def _reserve_many(api: Api, sid: str, prefix: str, n: int) -> set[str]:
    ids = set()
    for i in range(n):
        status, body = await api.reserve(sid, f"{prefix}-{i}", 1, key=f"{prefix}-{i}")
        assert status == 202, body
        ids.add(str(body["order_id"]))
    return ids


async def _persisted(b: Backends, ids: set[str]) -> bool:
    n = await b.pg.fetchval(
        "SELECT count(*) FROM orders WHERE order_id = ANY($1::text[]) "
        "AND status = 'awaiting_payment'", list(ids),
    )
    return int(n) == len(ids)


async def _dlq(b: Backends, sale_id: str) -> list[dict[str, str]]:
    raw: Any = await b.redis.xrange(b.keys(sale_id).dlq)
    return [{k.decode(): v.decode(errors="replace") for k, v in f.items()} for _id, f in raw]


async def test_poison_entries_dead_lettered_others_persisted(
    chaos_settings: Settings, direct: Backends, figures: Figures
) -> None:
    settings = replace(chaos_settings, consumer_max_deliveries=MAX_DELIVERIES)
    b = replace(direct, settings=settings)
    async with running_app(settings) as api:
        await _unknown_sale(api, b, figures)
        await _malformed_and_failing(api, b, figures)


async def _unknown_sale(api: Api, b: Backends, figures: Figures) -> None:
    """The sale row is gone from PostgreSQL after the consumer listed the sale."""
    sid = (await api.create_sale(stock=5, per_user_limit=2))["sale_id"]
    m = Metrics()
    consumer = Persister(b, m, name="lister")
    await consumer.step()  # lists the sale's stream (refreshed once a second)
    await b.pg.execute("DELETE FROM sales WHERE sale_id = $1", sid)
    status, body = await api.reserve(sid, "carol", 2, key="k-1")  # Redis still sells it
    assert status == 202, body
    await consumer.step()
    dlq = await _dlq(b, sid)
    k = b.keys(sid)
    available, pending = await b.redis.hmget(k.sale, "available", "pending")
    assert available is not None and pending is not None
    figures.update(unknown_sale_dlq=[d["reason"] for d in dlq])
    assert [d["o"] for d in dlq] == [body["order_id"]]
    assert dlq[0]["reason"] == "sale not in PostgreSQL"
    assert _dead_lettered_total(m) == 1
    assert (int(available), int(pending)) == (5, 0), "the hold was not returned"
    assert await b.redis.xlen(k.stream) == 0 and await b.redis.hlen(k.holds) == 0


async def _malformed_and_failing(api: Api, b: Backends, figures: Figures) -> None:
    sid = (await api.create_sale(stock=100, per_user_limit=10))["sale_id"]
    k = b.keys(sid)
    before = await _reserve_many(api, sid, "early", 10)
    await b.redis.xadd(k.stream, {"o": "junk-1", "q": "abc"})  # unparseable quantity
    await b.redis.xadd(k.stream, {"x": "y"})  # no fields at all
    # a real reservation (the real script, a real hold) that PostgreSQL refuses
    # forever: a buyer id longer than orders.user_id's CHECK (1..64) allows
    poison = await Reserver(b).reserve(sid, "p" * 65, 2, "poison")
    assert isinstance(poison, Accepted), poison
    after = await _reserve_many(api, sid, "late", 10)

    m = Metrics()
    stop = asyncio.Event()
    started = time.monotonic()
    task = asyncio.create_task(Persister(b, m, name="survivor").run(stop))
    try:
        await eventually(lambda: _persisted(b, before | after), timeout_s=10)
        good_s = time.monotonic() - started
        still_retried = bool(await b.redis.hexists(k.pending, poison.order_id))  # not yet DLQ'd
        # orders accepted while the poison is being retried go through as well
        t0 = time.monotonic()
        during = await _reserve_many(api, sid, "during", 5)
        await eventually(lambda: _persisted(b, during), timeout_s=10)
        during_s = time.monotonic() - t0

        async def poison_gone() -> bool:
            return any(d["o"] == poison.order_id for d in await _dlq(b, sid))

        await eventually(poison_gone, timeout_s=20)
        poison_s = time.monotonic() - started
        await eventually(lambda: _drained(b, sid), timeout_s=10)
    finally:
        stop.set()
        await task
    dlq = await _dlq(b, sid)
    a = await audit(b, sid)
    figures.update(
        good_persisted_s=round(good_s, 2), poison_still_retried_then=still_retried,
        persisted_while_poison_retried_s=round(during_s, 2),
        poison_dead_lettered_after_s=round(poison_s, 2), max_deliveries=MAX_DELIVERIES,
        dlq=[{"o": d["o"], "q": d["q"], "reason": d["reason"][:80]} for d in dlq],
        dead_lettered_total=_dead_lettered_total(m),
        consumer_errors_total=_counter(m, "flashsale_consumer_errors_total"), ledger=a.ledger,
    )
    print(f"\npoison: good orders persisted in {good_s:.2f}s, orders during retries in "
          f"{during_s:.2f}s, poison dead-lettered after {poison_s:.2f}s, dlq {len(dlq)}")

    assert _counter(m, "flashsale_consumer_errors_total") == 0, "a consumer round failed"
    assert still_retried, "the poison was dead-lettered before the good ones were through"
    assert [d["o"] for d in dlq[:2]] == ["junk-1", ""]
    assert dlq[2]["o"] == poison.order_id, dlq[2]
    assert "CheckViolation" in dlq[2]["reason"] or "too many" in dlq[2]["reason"], dlq[2]
    assert len(dlq) == 3
    assert _dead_lettered_total(m) == 3
    assert set(a.rows) == before | after | during
    assert a.status_counts() == {"awaiting_payment": 25}
    assert a.drained and a.holds == 25
    assert a.available == 100 - 25, "the poison's hold was not returned"
    assert await b.redis.hget(k.users, "p" * 65) is None
    assert a.ledger["consistent"] is True, a.ledger


async def _drained(b: Backends, sale_id: str) -> bool:
    return (await audit(b, sale_id)).drained
