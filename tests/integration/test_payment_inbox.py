"""The payment inbox on real Redis and PostgreSQL: a verified gateway event for
an order still `pending` (only in Redis) is kept durably and answered 200,
then applied exactly once by the compensator's inbox loop, through the
webhook's own code path: paid (then shipped) once the consumer persists the
order, or refunded when the order is released (expired, cancelled, dead-
lettered) before it ever is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flashsale.core.clients import as_text
from flashsale.core.compensate import Compensator
from flashsale.ops.metrics import Metrics
from tests.commerce import Shop, running_shop, shop_settings
from tests.support import eventually

# the inbox's first retries come quickly in these tests; the cap stays small
INBOX: dict[str, Any] = {"payment_inbox_backoff_base_s": 0.02,
                         "payment_inbox_backoff_max_s": 0.2}


@pytest.fixture
async def shop(redis_url: str, database_url: str) -> AsyncIterator[Shop]:
    async with running_shop(shop_settings(redis_url, database_url, **INBOX)) as s:
        yield s


async def _queued(shop: Shop, event: dict[str, Any]) -> None:
    """The gateway's event for a pending order: taken at once (200), kept in the inbox."""
    status, body = await shop.webhook(event)
    assert (status, body) == (200, {"status": "ok", "event_id": event["event_id"],
                                    "outcome": "queued"}), body
    row = await shop.row("SELECT * FROM payment_inbox WHERE event_id = $1", event["event_id"])
    assert row["applied_at"] is None and row["order_id"] == event["order_id"]
    assert await shop.count(
        "SELECT count(*) FROM webhook_events WHERE event_id = $1", event["event_id"]) == 0


async def _inbox_until_applied(shop: Shop, event_id: str) -> str:
    """Compensator rounds until the inbox has applied the event; its outcome."""
    comp = Compensator(shop.b, Metrics(), name="inbox-test")

    async def applied() -> str | None:
        await comp.step()
        outcome: str | None = await shop.value(
            "SELECT outcome FROM payment_inbox WHERE event_id = $1", event_id)
        return outcome

    return str(await eventually(applied, timeout_s=10, interval_s=0.02))


async def _effects(shop: Shop, oid: str) -> dict[str, Any]:
    """What the order's payment events did, counted."""
    return {
        "webhook_events": await shop.count(
            "SELECT count(*) FROM webhook_events WHERE order_id = $1", oid),
        "sagas": await shop.count("SELECT count(*) FROM order_sagas WHERE order_id = $1", oid),
        "refunds": await shop.count("SELECT count(*) FROM refunds WHERE order_id = $1", oid),
        "releases": await shop.count("SELECT count(*) FROM releases WHERE order_id = $1", oid),
        "payment": await shop.value("SELECT status FROM payments WHERE order_id = $1", oid),
        "paid_events": len([e for e in await shop.domain_events(oid)
                            if e["type"] == "order_paid"]),
    }


async def _inbox_metrics(shop: Shop) -> dict[str, float]:
    status, text, _ = await shop.api.request("GET", "/metrics")
    assert status == 200
    out = {}
    for line in str(text).splitlines():
        if line.startswith("flashsale_payment_inbox_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# --------------------------------------------------------------------------- paid


async def test_a_payment_for_a_pending_order_is_kept_and_applied_once_persisted(
    shop: Shop,
) -> None:
    api = shop.api
    sid = (await api.create_sale(stock=3, price_cents=700))["sale_id"]
    oid = await shop.order(sid, "ivy", persist=False)
    p = await shop.paid_payment(oid, "ivy")
    event = shop.event(p)
    await _queued(shop, event)  # the old code answered 503 and kept nothing
    assert (await shop.get(oid, "ivy"))[1]["status"] == "pending"
    # a replayed delivery is taken too, and adds nothing
    assert (await shop.webhook(event))[1]["outcome"] == "duplicate"
    assert await shop.count("SELECT count(*) FROM payment_inbox WHERE order_id = $1", oid) == 1
    figures = await _inbox_metrics(shop)
    assert figures["flashsale_payment_inbox_events"] >= 1, figures
    assert figures["flashsale_payment_inbox_oldest_age_seconds"] >= 0, figures

    # the consumer lags: a round of the inbox leaves the event, backed off (bounded)
    assert await Compensator(shop.b, Metrics()).apply_payment_inbox() >= 1
    row = await shop.row(
        "SELECT attempts, applied_at, next_attempt_at - now() AS wait FROM payment_inbox "
        "WHERE event_id = $1", event["event_id"])
    assert row["attempts"] == 1 and row["applied_at"] is None
    assert 0 < row["wait"].total_seconds() <= INBOX["payment_inbox_backoff_max_s"]
    assert await shop.count(
        "SELECT count(*) FROM orders WHERE order_id = $1", oid) == 0  # still pending

    await api.drain(sid)  # the consumer persists the order ...
    assert await _inbox_until_applied(shop, event["event_id"]) == "paid"  # ... then it is paid
    assert await shop.status_of(oid) == "paid"
    assert await shop.saga().step() == 1
    _status, seen = await shop.get(oid, "ivy")
    assert seen["status"] == "shipped" and seen["payment_id"] == p["payment_id"], seen

    # once applied, replays and further rounds change nothing
    assert (await shop.webhook(event))[1]["outcome"] == "duplicate"
    await api.compensate()
    assert await _effects(shop, oid) == {"webhook_events": 1, "sagas": 1, "refunds": 0,
                                         "releases": 0, "payment": "succeeded",
                                         "paid_events": 1}
    assert await shop.value(
        "SELECT outcome FROM webhook_events WHERE event_id = $1", event["event_id"]) == "paid"
    led = await api.ledger(sid)
    assert (led["shipped"], led["available"], led["consistent"]) == (1, 2, True), led


async def test_a_payment_taken_in_time_wins_over_a_hold_that_ran_out_while_it_waited(
    shop: Shop,
) -> None:
    """The hold is judged when the gateway delivered the event: a payment kept in
    the inbox before the hold ended pays the order even when it is applied after
    (the expiry sweep leaves such an order to the inbox)."""
    sid = (await shop.api.create_sale(stock=2, price_cents=400))["sale_id"]
    oid = await shop.order(sid, "tim", persist=False)
    p = await shop.paid_payment(oid, "tim")
    event = shop.event(p)
    await _queued(shop, event)
    await shop.api.drain(sid)
    # the hold ends after the delivery but before the inbox gets to it
    await shop.b.pg.execute(
        "UPDATE orders SET expires_at = (SELECT received_at FROM payment_inbox "
        "WHERE event_id = $2) + interval '1 millisecond' WHERE order_id = $1",
        oid, event["event_id"])
    await asyncio.sleep(0.01)
    await Compensator(shop.b, Metrics()).expire_due()  # the sweep leaves it to the inbox
    assert await shop.status_of(oid) == "awaiting_payment"
    assert await _inbox_until_applied(shop, event["event_id"]) == "paid"
    assert await shop.status_of(oid) == "paid"
    effects = await _effects(shop, oid)
    assert (effects["refunds"], effects["releases"], effects["payment"]) == (0, 0, "succeeded")
    assert (await shop.api.ledger(sid))["consistent"] is True


async def test_inbox_rounds_and_replays_racing_apply_the_event_once(shop: Shop) -> None:
    api = shop.api
    n = 6
    sid = (await api.create_sale(stock=n, price_cents=100))["sale_id"]
    users = [f"racy-{i}" for i in range(n)]
    oids = [await shop.order(sid, u, persist=False) for u in users]
    events = [shop.event(await shop.paid_payment(oid, u)) for oid, u in zip(oids, users,
                                                                           strict=True)]
    for event in events:
        await _queued(shop, event)
    await api.drain(sid)
    await shop.b.pg.execute(
        "UPDATE payment_inbox SET next_attempt_at = now() WHERE order_id = ANY($1::text[])",
        oids)
    comps = [Compensator(shop.b, Metrics(), name=f"c{i}") for i in range(3)]
    rounds = asyncio.gather(*(c.step() for c in comps))
    replies = asyncio.gather(*(shop.webhook(e) for e in events for _ in range(2)))
    _, answers = await asyncio.gather(rounds, replies)
    webhook_outcomes = [body["outcome"] for _status, body in answers]
    assert set(webhook_outcomes) <= {"paid", "duplicate"}, webhook_outcomes
    for i, event in enumerate(events):
        # the kept event is closed with what it did, by whichever path applied it:
        # a replay (its answer says "paid"), or the inbox (every replay "duplicate")
        assert await _inbox_until_applied(shop, event["event_id"]) == "paid"
        assert webhook_outcomes[2 * i:2 * i + 2].count("paid") <= 1, webhook_outcomes
    await shop.saga().step()
    for oid in oids:
        assert await shop.status_of(oid) == "shipped"
        assert await _effects(shop, oid) == {"webhook_events": 1, "sagas": 1, "refunds": 0,
                                             "releases": 0, "payment": "succeeded",
                                             "paid_events": 1}
    led = await api.ledger(sid)
    assert (led["shipped"], led["available"], led["consistent"]) == (n, 0, True), led


# --------------------------------------------------------------------------- released first


async def _refunded_once(shop: Shop, oid: str, reason: str) -> None:
    refund = await shop.row("SELECT * FROM refunds WHERE order_id = $1", oid)
    assert refund["reason"] == reason, refund
    effects = await _effects(shop, oid)
    assert (effects["webhook_events"], effects["sagas"], effects["refunds"],
            effects["payment"], effects["paid_events"]) == (1, 0, 1, "refunded", 0), effects


async def test_a_kept_payment_whose_order_expires_before_it_is_persisted_is_refunded_once(
    shop: Shop,
) -> None:
    api = shop.api
    sid = (await api.create_sale(stock=2, price_cents=900, hold_seconds=1))["sale_id"]
    oid = await shop.order(sid, "eve", persist=False)
    p = await shop.paid_payment(oid, "eve")
    # the mock gateway takes the money and delivers once (its retries are spent)
    status, settled = await shop.settle(p["payment_id"])
    assert status == 200, settled
    assert (settled["webhook_status"], settled["webhook_response"]["outcome"]) == (
        200, "queued"), settled  # the old code answered 503: nothing kept, never refunded
    event = shop.event(p, event_id=settled["event_id"])
    await asyncio.sleep(1.2)  # the hold runs out while the consumer is behind
    assert await _inbox_until_applied(shop, event["event_id"]) == "refunded"
    assert await shop.status_of(oid) == "expired"
    await api.drain(sid)  # the consumer catches up: the order is expired already
    await api.compensate()
    assert (await shop.webhook(event))[1]["outcome"] == "duplicate"
    await _refunded_once(shop, oid, "order_expired")
    assert await shop.count("SELECT count(*) FROM releases WHERE order_id = $1", oid) == 1
    led = await api.ledger(sid)
    assert (led["expired"], led["available"], led["paid"], led["consistent"]) == (
        1, 2, 0, True), led
    assert (await api.request("GET", f"/api/v1/sales/{sid}"))[1]["available"] == 2
    await shop.saga().refund_due()
    assert await shop.value("SELECT status FROM refunds WHERE order_id = $1", oid) == "succeeded"


async def test_a_kept_payment_whose_order_is_cancelled_while_pending_is_refunded_once(
    shop: Shop,
) -> None:
    api = shop.api
    sid = (await api.create_sale(stock=2, price_cents=600))["sale_id"]
    oid = await shop.order(sid, "cal", persist=False)
    p = await shop.paid_payment(oid, "cal")
    event = shop.event(p)
    await _queued(shop, event)
    status, body = await shop.cancel(oid, "cal")
    assert (status, body["status"]) == (200, "cancelled"), body
    assert await _inbox_until_applied(shop, event["event_id"]) == "refunded"
    await api.drain(sid)
    await api.compensate()
    assert await shop.status_of(oid) == "cancelled"
    await _refunded_once(shop, oid, "order_cancelled")
    led = await api.ledger(sid)
    assert (led["cancelled"], led["available"], led["consistent"]) == (1, 2, True), led
    assert (await api.request("GET", f"/api/v1/sales/{sid}"))[1]["available"] == 2


async def test_a_kept_payment_whose_reservation_is_dead_lettered_is_refunded_once(
    shop: Shop,
) -> None:
    """The order never reaches PostgreSQL: its stream entry is dead-lettered (as the
    consumer does with one it cannot persist) and its hold returned."""
    api, b = shop.api, shop.b
    sid = (await api.create_sale(stock=2, price_cents=800))["sale_id"]
    oid = await shop.order(sid, "dee", persist=False)
    p = await shop.paid_payment(oid, "dee")
    event = shop.event(p)
    await _queued(shop, event)
    k = b.keys(sid)
    resp: Any = await b.redis.xreadgroup(
        b.settings.consumer_group, "doomed", {k.stream: ">"}, count=10)
    [(_stream, [(entry_id, fields)])] = resp
    assert as_text(fields[b"o"]) == oid
    moved, released = await b.scripts.dead_letter(
        keys=[k.sale, k.users, k.holds, k.pending, k.stream, k.dlq],
        args=[b.settings.consumer_group, as_text(entry_id), oid, 1, "test: cannot persist",
              "", 1000],
    )
    assert (int(moved), int(released)) == (1, 1)
    assert await _inbox_until_applied(shop, event["event_id"]) == "refunded"
    assert await shop.count("SELECT count(*) FROM orders WHERE order_id = $1", oid) == 0
    await api.compensate()
    assert (await shop.webhook(event))[1]["outcome"] == "duplicate"
    refund = await shop.row("SELECT * FROM refunds WHERE order_id = $1", oid)
    assert refund["reason"] == "order_missing"
    assert await shop.count("SELECT count(*) FROM refunds WHERE order_id = $1", oid) == 1
    assert await shop.value("SELECT status FROM payments WHERE order_id = $1", oid) == "refunded"
    assert (await api.request("GET", f"/api/v1/sales/{sid}"))[1]["available"] == 2
    assert (await api.ledger(sid))["consistent"] is True


async def test_an_event_for_an_order_that_never_existed_is_refused(shop: Shop) -> None:
    """Only a payment made through POST /pay (for an order that existed, pending or
    persisted) can be settled: an event naming another order id, or a garbage one,
    is refused and kept nowhere."""
    sid = (await shop.api.create_sale(stock=1, price_cents=100))["sale_id"]
    oid = await shop.order(sid, "gus", persist=False)
    p = await shop.paid_payment(oid, "gus")
    for order_id in (f"{sid}-{'0' * 21}", "garbage", "sl_nosuchsale0-" + "0" * 21):
        status, body = await shop.webhook(shop.event(p, order_id=order_id))
        assert (status, body["error"]["code"]) == (400, "invalid_request"), body
    assert await shop.count(
        "SELECT count(*) FROM payment_inbox WHERE payment_id = $1", p["payment_id"]) == 0
    await _queued(shop, shop.event(p))  # the real one is kept
    await shop.api.drain(sid)
    await _inbox_until_applied(shop, (await shop.value(
        "SELECT event_id FROM payment_inbox WHERE payment_id = $1", p["payment_id"])))
    assert await shop.status_of(oid) == "paid"
