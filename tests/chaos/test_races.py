"""Races with exactly one winner: whoever commits first in PostgreSQL wins, the
loser changes nothing, and the stock comes back once.

* a buyer's cancel vs the compensator's expiry, on the same due orders
  (persisted ones and ones still pending in Redis);
* two compensators stepping at once over the same due orders, unpersisted
  orders and outbox rows (each with its own connections);
* expiry vs late persistence: the consumer and the compensator at once on
  due orders the consumer has not persisted yet.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from flashsale.config import Settings
from flashsale.core import release
from flashsale.core.backends import Backends, open_backends
from flashsale.core.compensate import Compensator
from flashsale.core.persist import Persister
from flashsale.ops.metrics import Metrics
from tests.chaos.conftest import Figures
from tests.chaos.harness import Audit, Request, audit, burst
from tests.support import Api, running_app

pytestmark = pytest.mark.chaos

JITTER_S = 0.3


async def _reserve(api: Api, sid: str, prefix: str, n: int) -> dict[str, Request]:
    reqs = [Request(f"{prefix}-{i}", f"{prefix}-k{i}", 1) for i in range(n)]
    results = await burst(api.base, sid, reqs)
    assert all(s == 202 for _r, s, _b in results), results[:3]
    return {str(body["order_id"]): r for r, _s, body in results}


@asynccontextmanager
async def _own_backends(settings: Settings) -> AsyncIterator[Backends]:
    """Separate pools and Redis clients, as two processes would have."""
    async with open_backends(settings) as b:
        yield b


def _assert_released_once(a: Audit, orders: set[str], stock: int) -> None:
    assert set(a.releases) == orders, "an order released zero times"
    assert all(s in ("cancelled", "expired") for s, _q in a.rows.values()), a.status_counts()
    assert all(done for _r, done in a.releases.values())
    assert a.available == stock and a.holds == 0, "stock not back exactly once"
    assert a.sold == 0
    assert a.drained
    assert a.ledger["consistent"] is True, a.ledger


async def test_cancel_vs_expiry_one_winner(
    chaos_settings: Settings, direct: Backends, figures: Figures
) -> None:
    stock = 100
    async with running_app(chaos_settings) as api:
        sid = (await api.create_sale(stock=stock, per_user_limit=5, hold_seconds=1))["sale_id"]
        persisted = await _reserve(api, sid, "p", 30)
        await api.drain(sid)
        pending = await _reserve(api, sid, "q", 30)
        await asyncio.sleep(1.2)  # all of them are due now
        orders = {**persisted, **pending}
        items = list(orders.items())
        answers: dict[str, int] = {}
        rnd = random.Random()

        async def cancel(oid: str, req: Request) -> None:
            await asyncio.sleep(rnd.uniform(0.0, JITTER_S))  # buyers click at random moments
            status, _body, _ = await api.request(
                "POST", f"/api/v1/orders/{oid}/cancel", headers=api.buyer(req.user)
            )
            answers[oid] = status

        async with _own_backends(chaos_settings) as b2:
            comp = Compensator(b2, Metrics(), name="expirer")

            async def expire_midway(unpersisted: bool) -> int:
                await asyncio.sleep(JITTER_S / 3)  # the compensator lands among the cancels
                # both halves of its round at once, so that each meets cancels in flight
                return await (comp.expire_unpersisted() if unpersisted else comp.expire_due())

            await asyncio.gather(
                expire_midway(False), expire_midway(True), *(cancel(o, r) for o, r in items)
            )
            await comp.step()  # what the race left due
        await api.drain(sid)
        a = await audit(direct, sid)

    won = Counter(
        ("cancel" if a.rows[o][0] == "cancelled" else "expiry", "persisted" if o in persisted
         else "pending") for o in orders
    )
    figures.update(
        orders=len(orders), answers=dict(Counter(answers.values())),
        winners={f"{w}/{k}": n for (w, k), n in won.items()}, ledger=a.ledger,
    )
    print(f"\ncancel vs expiry: {dict(won)}, answers {dict(Counter(answers.values()))}")
    assert set(answers.values()) <= {200, 409}, answers
    for oid, status in answers.items():  # the buyer was told the truth
        assert (status == 200) == (a.rows[oid][0] == "cancelled"), (oid, status, a.rows[oid])
    assert {r for r, _d in a.releases.values()} <= {"cancelled", "expired"}
    _assert_released_once(a, set(orders), stock)


async def test_two_compensators_at_once(
    chaos_settings: Settings, direct: Backends, figures: Figures
) -> None:
    stock = 200
    async with running_app(chaos_settings) as api:
        sid = (await api.create_sale(stock=stock, per_user_limit=5, hold_seconds=1))["sale_id"]
        due = await _reserve(api, sid, "due", 50)
        await api.drain(sid)
        unpersisted = await _reserve(api, sid, "unp", 50)
        outbox_sale = (await api.create_sale(stock=stock, per_user_limit=5))["sale_id"]
        held = await _reserve(api, outbox_sale, "held", 40)
        await api.drain(outbox_sale)
        for oid in held:  # released in PostgreSQL only: outbox rows for the sweep
            assert await release.transition(direct.pg, oid, "cancelled", "test") is not None
        await asyncio.sleep(1.2)  # holds due, outbox rows past their grace

        async with _own_backends(chaos_settings) as b1, _own_backends(chaos_settings) as b2:
            c1 = Compensator(b1, Metrics(), name="c1")
            c2 = Compensator(b2, Metrics(), name="c2")
            done = await asyncio.gather(c1.step(), c2.step(), c1.step(), c2.step())
        await api.drain(sid)
        a = await audit(direct, sid)
        o = await audit(direct, outbox_sale)

    actors = Counter(
        r["actor"] for r in await direct.pg.fetch(
            "SELECT actor FROM releases WHERE sale_id = $1", sid
        )
    )
    figures.update(
        due_persisted=len(due), due_unpersisted=len(unpersisted), outbox_rows=len(held),
        releases_by_compensator=dict(actors), step_results=list(done), ledger=a.ledger,
        outbox_ledger=o.ledger,
    )
    print(f"\ntwo compensators: releases by {dict(actors)}, steps returned {done}")
    _assert_released_once(a, set(due) | set(unpersisted), stock)
    assert set(o.releases) == set(held) and all(d for _r, d in o.releases.values())
    assert o.available == stock and o.holds == 0 and o.ledger["consistent"] is True, o.ledger


async def test_expiry_vs_late_persistence(
    chaos_settings: Settings, direct: Backends, figures: Figures
) -> None:
    stock = 100
    async with running_app(chaos_settings) as api:
        sid = (await api.create_sale(stock=stock, per_user_limit=5, hold_seconds=1))["sale_id"]
        orders = await _reserve(api, sid, "late", 80)
        await asyncio.sleep(1.2)  # due before the consumer ever saw them
        async with _own_backends(chaos_settings) as b1, _own_backends(chaos_settings) as b2:
            consumer = Persister(b1, Metrics(), name="late-consumer")
            comp = Compensator(b2, Metrics(), name="expirer")
            await asyncio.gather(consumer.step(), comp.step())
            await comp.step()  # expires what the consumer persisted first
        await api.drain(sid)
        a = await audit(direct, sid)

    details = Counter(
        r["detail"] or "persisted, then expired" for r in await direct.pg.fetch(
            "SELECT detail FROM releases WHERE sale_id = $1", sid
        )
    )
    figures.update(orders=len(orders), releases=dict(details), ledger=a.ledger)
    print(f"\nexpiry vs late persistence: {dict(details)}")
    assert a.status_counts() == {"expired": len(orders)}
    _assert_released_once(a, set(orders), stock)
