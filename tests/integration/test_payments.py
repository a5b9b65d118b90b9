"""Payments through HTTP on real Redis and PostgreSQL: pay, the signed webhook,
the mock gateway, refunds on late payments, races with cancel, ownership."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from flashsale.core.events import Notifier
from tests.commerce import Shop, running_shop, shop_settings


@pytest.fixture
async def shop(redis_url: str, database_url: str) -> AsyncIterator[Shop]:
    async with running_shop(shop_settings(redis_url, database_url)) as s:
        yield s


async def _past_hold(shop: Shop, order_id: str) -> None:
    await shop.b.pg.execute(
        "UPDATE orders SET expires_at = now() - interval '1 second' WHERE order_id = $1",
        order_id,
    )


async def _webhook_rows(shop: Shop, order_id: str) -> int:
    return await shop.count("SELECT count(*) FROM webhook_events WHERE order_id = $1", order_id)


# --------------------------------------------------------------------------- lifecycle


async def test_full_lifecycle_reserve_pay_settle_ship(
    shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    api = shop.api
    sid = (await api.create_sale(stock=5, per_user_limit=2, price_cents=1250))["sale_id"]
    status, accepted = await api.reserve(sid, "alice", 2, key="life-1")
    assert status == 202 and accepted["status"] == "pending", accepted
    oid = accepted["order_id"]
    await api.drain(sid)
    assert (await shop.get(oid, "alice"))[1]["status"] == "awaiting_payment"

    status, p = await shop.pay(oid, "alice")
    assert status == 201, p
    assert p == {"payment_id": p["payment_id"], "order_id": oid, "amount_cents": 2500,
                 "status": "requires_payment"}
    assert await shop.pay(oid, "alice") == (201, p)  # same payment on repeat
    status, seen = await shop.get(oid, "alice")
    assert seen["status"] == "awaiting_payment" and seen["payment_id"] == p["payment_id"]

    status, settled = await shop.settle(p["payment_id"])
    assert status == 200, settled
    assert settled["webhook_status"] == 200 and settled["type"] == "payment.succeeded"
    assert settled["webhook_response"]["outcome"] == "paid"
    assert (await shop.get(oid, "alice"))[1]["status"] == "paid"

    assert await shop.saga().step() == 1
    status, shipped = await shop.get(oid, "alice")
    assert shipped["status"] == "shipped" and shipped["payment_id"] == p["payment_id"]
    assert shipped["shipment_id"].startswith("shp_") and shipped["tracking_number"]
    led = await api.ledger(sid)
    assert led["shipped"] == 2 and led["available"] == 3 and led["consistent"] is True

    assert (await shop.pay(oid, "alice"))[1]["error"]["code"] == "order_not_payable"
    assert (await shop.cancel(oid, "alice"))[1]["error"]["code"] == "order_not_cancellable"

    kinds = [e["type"] for e in await shop.domain_events(oid)]
    assert kinds == ["order_accepted", "order_paid", "order_shipped"]
    with caplog.at_level(logging.INFO, logger="flashsale.notify"):
        assert await Notifier(shop.b).step(block_ms=None) >= 3
    assert f"order_shipped order={oid}" in caplog.text


async def test_a_pending_order_is_payable_and_its_webhook_waits_for_persistence(
    shop: Shop,
) -> None:
    sid = (await shop.api.create_sale(stock=3, price_cents=700))["sale_id"]
    oid = await shop.order(sid, "penny", persist=False)
    p = await shop.paid_payment(oid, "penny")
    assert p["amount_cents"] == 700
    status, seen = await shop.get(oid, "penny")
    assert seen["status"] == "pending" and seen["payment_id"] == p["payment_id"]

    event = shop.event(p)
    status, body = await shop.webhook(event)
    assert (status, body["outcome"]) == (200, "queued")  # kept in the payment inbox
    assert await _webhook_rows(shop, oid) == 0  # not applied yet: the order is pending

    await shop.api.drain(sid)
    status, body = await shop.webhook(event)  # a retry now applies it (the inbox then won't)
    assert (status, body["outcome"]) == (200, "paid")
    assert await shop.status_of(oid) == "paid"
    await shop.api.compensate()
    assert await shop.value(
        "SELECT outcome FROM payment_inbox WHERE event_id = $1", event["event_id"]) == "paid"
    assert await _webhook_rows(shop, oid) == 1


async def test_payment_failed_leaves_the_order_payable(shop: Shop) -> None:
    sid = (await shop.api.create_sale(stock=2))["sale_id"]
    oid = await shop.order(sid, "fay")
    p = await shop.paid_payment(oid, "fay")
    status, settled = await shop.settle(p["payment_id"], "failed")
    assert status == 200 and settled["webhook_response"]["outcome"] == "payment_failed"
    assert await shop.status_of(oid) == "awaiting_payment"
    assert await shop.pay(oid, "fay") == (201, p)  # payable again, same payment
    status, settled = await shop.settle(p["payment_id"], "succeeded")
    assert settled["webhook_response"]["outcome"] == "paid"
    assert await shop.status_of(oid) == "paid"


# --------------------------------------------------------------------------- webhook security


async def test_forged_webhooks_are_rejected_and_a_replay_changes_state_once(shop: Shop) -> None:
    sid = (await shop.api.create_sale(stock=2, price_cents=999))["sale_id"]
    oid = await shop.order(sid, "victor")
    p = await shop.paid_payment(oid, "victor")
    event = shop.event(p, event_id="evt_replayed")
    raw = orjson.dumps(event)
    now = int(time.time())
    flipped = bytearray(raw)
    flipped[raw.index(b"999")] = ord("1")  # one byte of the body changed: amount 199
    forged: list[dict[str, Any]] = [
        {"raw": raw, "header": ""},  # missing
        {"raw": raw, "header": "garbage"},
        {"raw": raw, "header": "t=abc,v1=zz"},
        {"raw": raw, "header": f"v1={'0' * 64}"},
        {"raw": raw, "header": f"t={now}"},
        {"raw": raw, "header": f"t={now},v1={'0' * 64}"},
        {"raw": raw, "secret": "not-the-webhook-secret-0123456789"},
        {"raw": bytes(flipped), "signed_raw": raw},
        # more than 300 s off, counted from the moment of sending (a slow
        # machine must not bring a fixed timestamp back within the tolerance)
        {"raw": raw, "t_offset_s": -305},
        {"raw": raw, "t_offset_s": 305},
    ]
    for case in forged:
        status, body = await shop.webhook(**case)
        assert (status, body["error"]["code"]) == (400, "invalid_signature"), (case, body)
    assert await _webhook_rows(shop, oid) == 0
    assert await shop.status_of(oid) == "awaiting_payment"

    malformed: list[bytes] = [
        b"not json", b"[]", orjson.dumps({**event, "status": "paid"}),
        orjson.dumps({**event, "type": "payment.refunded"}),
        orjson.dumps({**event, "amount_cents": "999"}),
        orjson.dumps({**event, "amount_cents": 1}),  # signed, but not the payment's amount
        orjson.dumps({**event, "payment_id": "pay_" + "0" * 24}),
        orjson.dumps({k: v for k, v in event.items() if k != "event_id"}),
    ]
    for bad in malformed:
        status, body = await shop.webhook(raw=bad)
        assert (status, body["error"]["code"]) == (400, "invalid_request"), (bad, body)
    assert await _webhook_rows(shop, oid) == 0

    outcomes = []
    for i in range(5):  # the first one near the edge of the tolerance
        status, body = await shop.webhook(raw=raw, t=now - 290 if i == 0 else None)
        assert status == 200, body
        outcomes.append(body["outcome"])
    assert outcomes == ["paid"] + ["duplicate"] * 4
    assert await _webhook_rows(shop, oid) == 1
    assert await shop.status_of(oid) == "paid"
    assert await shop.count("SELECT count(*) FROM order_sagas WHERE order_id = $1", oid) == 1
    paid_events = [e for e in await shop.domain_events(oid) if e["type"] == "order_paid"]
    assert len(paid_events) == 1
    # another event id for the same, settled payment changes nothing either
    status, body = await shop.webhook(shop.event(p))
    assert (status, body["outcome"]) == (200, "no_change")


# --------------------------------------------------------------------------- late payments


async def test_webhook_after_expiry_records_a_refund_and_never_resurrects(shop: Shop) -> None:
    api = shop.api
    sid = (await api.create_sale(stock=4, per_user_limit=2, price_cents=300))["sale_id"]
    owners = {await shop.order(sid, "late-1", 2): "late-1",
              await shop.order(sid, "late-2", 1): "late-2"}
    swept, unswept = owners
    pays = {oid: await shop.paid_payment(oid, user) for oid, user in owners.items()}
    # the compensator expires one; the other is past its hold but not swept yet
    await _past_hold(shop, swept)
    assert await api.compensate() >= 1
    await _past_hold(shop, unswept)
    assert await shop.status_of(swept) == "expired"
    assert await shop.status_of(unswept) == "awaiting_payment"

    for oid in (swept, unswept):
        event = shop.event(pays[oid])
        for expected in ("refunded", "duplicate"):
            status, body = await shop.webhook(event)
            assert (status, body["outcome"]) == (200, expected), body
        assert await shop.status_of(oid) == "expired"
        refund = await shop.row("SELECT * FROM refunds WHERE order_id = $1", oid)
        assert refund is not None and refund["reason"] == "order_expired"
        assert refund["amount_cents"] == pays[oid]["amount_cents"]
        assert await shop.value(
            "SELECT status FROM payments WHERE order_id = $1", oid) == "refunded"
        status, body = await shop.pay(oid, owners[oid])
        assert (status, body["error"]["code"]) == (409, "order_not_payable")

    assert await api.compensate() == 0  # nothing left to release: released once
    led = await api.ledger(sid)
    assert led["expired"] == 3 and led["paid"] == 0 and led["available"] == 4
    assert led["consistent"] is True
    releases = await shop.count("SELECT count(*) FROM releases WHERE sale_id = $1", sid)
    assert releases == 2
    assert await shop.saga().refund_due() == 2
    assert await shop.count(
        "SELECT count(*) FROM refunds WHERE order_id = ANY($1::text[]) AND status = 'succeeded'",
        [swept, unswept],
    ) == 2


async def test_webhook_on_a_cancelled_order_refunds(shop: Shop) -> None:
    sid = (await shop.api.create_sale(stock=2))["sale_id"]
    oid = await shop.order(sid, "cora")
    p = await shop.paid_payment(oid, "cora")
    assert (await shop.cancel(oid, "cora"))[0] == 200
    status, body = await shop.webhook(shop.event(p))
    assert (status, body["outcome"]) == (200, "refunded")
    assert await shop.status_of(oid) == "cancelled"
    assert await shop.value(
        "SELECT reason FROM refunds WHERE order_id = $1", oid) == "order_cancelled"
    assert (await shop.api.ledger(sid))["consistent"] is True


# --------------------------------------------------------------------------- races


async def test_concurrent_payment_and_cancel_have_exactly_one_outcome(shop: Shop) -> None:
    api = shop.api
    n = 12
    sid = (await api.create_sale(stock=n, price_cents=100))["sale_id"]
    users = [f"racer-{i}" for i in range(n)]
    oids = [await shop.order(sid, u, persist=False) for u in users]
    await api.drain(sid)
    pays = [await shop.paid_payment(oid, u) for oid, u in zip(oids, users, strict=True)]

    results = await asyncio.gather(*[
        asyncio.gather(shop.webhook(shop.event(p)), shop.cancel(oid, u))
        for p, oid, u in zip(pays, oids, users, strict=True)
    ])
    await shop.saga().step()
    cancelled = 0
    for oid, ((w_status, w_body), (c_status, c_body)) in zip(oids, results, strict=True):
        assert w_status == 200, w_body
        status = await shop.status_of(oid)
        refunds = await shop.count("SELECT count(*) FROM refunds WHERE order_id = $1", oid)
        if c_status == 200:  # cancel won: the payment came late and is refunded
            cancelled += 1
            assert (status, w_body["outcome"], refunds) == ("cancelled", "refunded", 1)
        else:  # payment won: the cancel was refused
            assert c_body["error"]["code"] == "order_not_cancellable"
            assert (status, w_body["outcome"], refunds) == ("shipped", "paid", 0)
    led = await api.ledger(sid)
    assert led["cancelled"] == cancelled and led["shipped"] == n - cancelled
    assert led["available"] == cancelled and led["consistent"] is True
    assert await shop.count("SELECT count(*) FROM releases WHERE sale_id = $1", sid) == cancelled


async def test_concurrent_pay_request_and_cancel(shop: Shop) -> None:
    sid = (await shop.api.create_sale(stock=8, price_cents=100))["sale_id"]
    for i in range(8):
        user = f"pc-{i}"
        oid = await shop.order(sid, user, persist=i % 2 == 0)  # pending and persisted ones
        (p_status, p_body), (c_status, _) = await asyncio.gather(
            shop.pay(oid, user), shop.cancel(oid, user)
        )
        assert c_status == 200
        assert p_status in (201, 409), p_body
        if p_status == 201:  # paid for an order cancelled meanwhile: refund, not resurrect
            await shop.api.drain(sid)
            status, body = await shop.webhook(shop.event(p_body))
            assert (status, body["outcome"]) == (200, "refunded")
        assert await shop.status_of(oid) == "cancelled"
    await shop.api.drain(sid)
    led = await shop.api.ledger(sid)
    assert led["cancelled"] == 8 and led["available"] == 8 and led["consistent"] is True


# --------------------------------------------------------------------------- security


async def test_another_buyers_order_is_404_for_get_cancel_and_pay(shop: Shop) -> None:
    sid = (await shop.api.create_sale(stock=3))["sale_id"]
    persisted = await shop.order(sid, "owner2")
    pending = await shop.order(sid, "owner", persist=False)
    for oid in (pending, persisted):
        for status, body in (
            await shop.get(oid, "intruder"), await shop.cancel(oid, "intruder"),
            await shop.pay(oid, "intruder"),
        ):
            assert (status, body["error"]["code"]) == (404, "order_not_found")
    assert await shop.count("SELECT count(*) FROM payments WHERE sale_id = $1", sid) == 0
    assert (await shop.get(pending, "owner"))[1]["status"] == "pending"
    assert (await shop.get(persisted, "owner2"))[1]["status"] == "awaiting_payment"


async def test_server_owned_fields_are_rejected(shop: Shop) -> None:
    api = shop.api
    sid = (await api.create_sale(stock=3, price_cents=500))["sale_id"]
    oid = await shop.order(sid, "mass")
    bodies: list[dict[str, Any]] = [{"amount_cents": 1}, {"status": "paid"},
                                    {"user_id": "other"}, {"payment_id": "pay_x"},
                                    {"order_id": oid}]
    for body in bodies:
        status, err = await shop.pay(oid, "mass", body)
        assert (status, err["error"]["code"]) == (400, "invalid_request"), body
    assert await shop.count("SELECT count(*) FROM payments WHERE order_id = $1", oid) == 0
    bodies = [{"quantity": 1, "price_cents": 0}, {"quantity": 1, "amount_cents": 0},
              {"quantity": 1, "status": "paid"}, {"quantity": 1, "user_id": "x"}]
    for body in bodies:
        status, err, _ = await api.request(
            "POST", f"/api/v1/sales/{sid}/orders", json=body, headers=api.buyer("mass")
        )
        assert (status, err["error"]["code"]) == (400, "invalid_request"), body
    for extra in ({"sold": 0}, {"available": 99}, {"status": "active"}, {"sale_id": "sl_x"}):
        status, err, _ = await api.request(
            "POST", "/api/v1/sales", headers=api.admin,
            json={"sku": "S", "name": "N", "price_cents": 1, "stock": 1, **extra},
        )
        assert (status, err["error"]["code"]) == (400, "invalid_request"), extra
    p = await shop.paid_payment(oid, "mass")
    path = f"/api/v1/admin/gateway/payments/{p['payment_id']}/settle"
    bodies = [{"outcome": "succeeded", "amount_cents": 1}, {"outcome": "refunded"}, {}]
    for body in bodies:
        status, err, _ = await api.request("POST", path, json=body, headers=api.admin)
        assert (status, err["error"]["code"]) == (400, "invalid_request"), body
    status, err, _ = await api.request(
        "POST", path, json={"outcome": "succeeded"}, headers=api.buyer("mass")
    )
    assert (status, err["error"]["code"]) == (401, "unauthorized")
    status, err = await shop.settle("pay_" + "0" * 24)
    assert (status, err["error"]["code"]) == (404, "payment_not_found")
    assert await shop.status_of(oid) == "awaiting_payment"
    assert (await api.ledger(sid))["consistent"] is True


# --------------------------------------------------------------------------- degradation


async def test_gateway_down_pay_fails_fast_and_reservations_go_on(shop: Shop) -> None:
    sid = (await shop.api.create_sale(stock=5, per_user_limit=5))["sale_id"]
    oid = await shop.order(sid, "gwen")
    gateway, breaker = shop.integrations.gateway, shop.integrations.gateway_breaker
    gateway.down = True
    threshold = shop.api.settings.breaker_failure_threshold
    for _ in range(threshold + 3):
        status, resp, raw = await shop.api.request(
            "POST", f"/api/v1/orders/{oid}/pay", headers=shop.api.buyer("gwen")
        )
        assert (status, resp["error"]["code"]) == (503, "unavailable")
        assert raw.headers["Retry-After"]
    assert gateway.calls == threshold  # then the breaker answered without calling
    assert breaker.opened_count == 1
    assert (await shop.api.reserve(sid, "gwen", 1))[0] == 202  # the reservation path is free

    gateway.down = False
    await asyncio.sleep(shop.api.settings.breaker_open_s)
    status, p = await shop.pay(oid, "gwen")
    assert status == 201
    assert p["payment_id"] == await shop.value(
        "SELECT payment_id FROM payments WHERE order_id = $1", oid
    )
