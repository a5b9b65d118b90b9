"""The fulfilment saga on real Redis and PostgreSQL: shipping with bounded
retries behind the carrier's breaker, compensation (refund and release),
crash resumption, refunds at the gateway, domain events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from flashsale.commerce import logistics
from flashsale.commerce.logistics import MockCarrier
from flashsale.commerce.saga import _CLAIM_SHIPMENTS, SagaRunner
from flashsale.core import events
from tests.commerce import Shop, running_shop, shop_settings

STEP_TIMEOUT_S = 10.0


@pytest.fixture
async def shop(redis_url: str, database_url: str) -> AsyncIterator[Shop]:
    async with running_shop(shop_settings(redis_url, database_url)) as s:
        yield s


async def _paid_order(shop: Shop, sid: str, user: str, qty: int = 1) -> str:
    oid = await shop.order(sid, user, qty)
    p = await shop.paid_payment(oid, user)
    status, body = await shop.webhook(shop.event(p))
    assert (status, body["outcome"]) == (200, "paid"), body
    return oid


async def _step_until(runner: SagaRunner, done: Callable[[], Awaitable[bool]]) -> int:
    """Step the runner (sleeping through backoffs) until ``done``; returns steps taken."""
    deadline = time.monotonic() + STEP_TIMEOUT_S
    steps = 0
    while not await done():
        assert time.monotonic() < deadline, "the saga did not finish in time"
        await runner.step()
        steps += 1
        await asyncio.sleep(0.005)
    return steps


async def _saga_step(shop: Shop, oid: str) -> str:
    return str(await shop.value(
        "SELECT step FROM order_sagas WHERE order_id = $1", oid
    ))


async def test_carrier_down_opens_the_breaker_retries_are_bounded_then_refund_and_release(
    shop: Shop,
) -> None:
    api, s = shop.api, shop.api.settings
    sid = (await api.create_sale(stock=4, per_user_limit=2, price_cents=800))["sale_id"]
    oid = await _paid_order(shop, sid, "sam", 2)
    carrier = MockCarrier(down=True)
    runner = shop.saga(carrier)
    breaker = runner._i.carrier_breaker

    async def compensated() -> bool:
        return await _saga_step(shop, oid) == "compensated"

    await _step_until(runner, compensated)
    assert carrier.calls == s.carrier_attempts_max  # bounded; open-breaker refusals are free
    assert breaker.opened_count >= 1

    _status, order = await shop.get(oid, "sam")
    assert order["status"] == "failed" and order["shipment_id"] is None
    release = await shop.row("SELECT * FROM releases WHERE order_id = $1", oid)
    assert (release["reason"], release["detail"]) == ("failed", "shipment failed")
    assert release["redis_released_at"] is not None
    refund = await shop.row("SELECT * FROM refunds WHERE order_id = $1", oid)
    assert refund["reason"] == "shipment_failed" and refund["amount_cents"] == 1600
    # executed at the gateway in the same round
    assert (refund["status"], refund["attempts"]) == ("succeeded", 1)
    assert await shop.value(
        "SELECT status FROM payments WHERE order_id = $1", oid) == "refunded"
    shipment = await shop.row("SELECT * FROM shipments WHERE order_id = $1", oid)
    assert (shipment["status"], shipment["attempts"]) == ("failed", s.carrier_attempts_max)
    led = await api.ledger(sid)
    assert led["failed"] == 2 and led["paid"] == 0 and led["available"] == 4
    assert led["consistent"] is True  # sold lowered with the release

    assert await runner.step() == 0  # nothing left: no further attempt, no second refund
    released = [e for e in await shop.domain_events(oid) if e["type"] == "order_released"]
    assert len(released) == 1 and released[0]["reason"] == "failed"
    # the buyer may order again: the failed quantity stopped counting
    assert (await api.reserve(sid, "sam", 2))[0] == 202


async def test_a_transient_carrier_failure_is_retried_with_backoff(shop: Shop) -> None:
    sid = (await shop.api.create_sale(stock=2))["sale_id"]
    oid = await _paid_order(shop, sid, "tina")
    carrier = MockCarrier(down=True)
    runner = shop.saga(carrier)
    assert await runner.step() == 1
    row = await shop.row("SELECT * FROM order_sagas WHERE order_id = $1", oid)
    assert (row["step"], row["attempts"]) == ("ship", 1)
    assert "carrier unavailable" in row["last_error"]
    assert row["next_attempt_at"] > row["updated_at"]  # rescheduled after the claim
    carrier.down = False

    async def shipped() -> bool:
        return await shop.status_of(oid) == "shipped"

    await _step_until(runner, shipped)
    row = await shop.row("SELECT * FROM order_sagas WHERE order_id = $1", oid)
    assert (row["step"], row["attempts"], row["last_error"]) == ("done", 2, None)
    assert [runner.backoff_s(n) for n in (1, 2, 3, 4, 10)] == [0.01, 0.02, 0.04, 0.05, 0.05]


async def test_the_saga_resumes_after_a_crash(shop: Shop) -> None:
    sid = (await shop.api.create_sale(stock=2))["sale_id"]
    oid = await _paid_order(shop, sid, "ursula")
    # a runner claims the saga, books the shipment, and dies before its commit
    claimed = await shop.b.pg.fetch(_CLAIM_SHIPMENTS, 10, 30.0)
    assert [r["order_id"] for r in claimed] == [oid]
    await MockCarrier().book(oid, 1)
    restarted = shop.saga(MockCarrier())
    assert await restarted.step() == 0  # leased by the dead runner
    await shop.b.pg.execute(  # the lease runs out
        "UPDATE order_sagas SET next_attempt_at = now() WHERE order_id = $1", oid
    )
    assert await restarted.step() == 1
    _status, order = await shop.get(oid, "ursula")
    booking = logistics.booking_for(oid)  # the carrier booked idempotently: one shipment
    assert (order["status"], order["shipment_id"], order["tracking_number"]) == (
        "shipped", booking.shipment_id, booking.tracking_number)
    assert await shop.value(
        "SELECT attempts FROM shipments WHERE order_id = $1", oid) == 2
    assert (await shop.api.ledger(sid))["consistent"] is True


async def test_refunds_at_a_failing_gateway_are_bounded(shop: Shop) -> None:
    sid = (await shop.api.create_sale(stock=2))["sale_id"]
    oid = await shop.order(sid, "vera")
    p = await shop.paid_payment(oid, "vera")
    assert (await shop.cancel(oid, "vera"))[0] == 200
    assert (await shop.webhook(shop.event(p)))[1]["outcome"] == "refunded"
    gateway = shop.integrations.gateway
    gateway.down = True
    calls_before = gateway.calls
    runner = shop.saga()

    async def settled() -> bool:
        status = await shop.value("SELECT status FROM refunds WHERE order_id = $1", oid)
        return bool(status != "requested")

    await _step_until(runner, settled)
    refund = await shop.row("SELECT * FROM refunds WHERE order_id = $1", oid)
    limit = shop.api.settings.refund_attempts_max
    assert (refund["status"], refund["attempts"]) == ("failed", limit)
    assert gateway.calls - calls_before == limit
    assert "gateway unavailable" in refund["last_error"]


async def test_publishing_never_breaks_the_flow(shop: Shop) -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        broken = replace(shop.b, redis=dead)
        event = events.DomainEvent("order_paid", "o", "s", {"amount_cents": 1})
        assert await events.publish(broken, [event]) == 0
    finally:
        await dead.aclose()
    assert await events.publish(shop.b, [event]) == 1
    assert (await shop.domain_events("o"))[0]["amount_cents"] == "1"
