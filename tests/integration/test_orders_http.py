"""The reservation path through HTTP, real Redis and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.support import Api


async def test_reserve_persist_read_cancel(api: Api) -> None:
    sale = await api.create_sale(stock=5, per_user_limit=2, price_cents=250)
    assert sale["status"] == "active" and sale["available"] == 5 and sale["stock"] == 5
    sid = sale["sale_id"]

    status, order = await api.reserve(sid, "alice", 2, key="k-1")
    assert status == 202, order
    assert order["status"] == "pending" and order["amount_cents"] == 500
    assert order["user_id"] == "alice" and order["quantity"] == 2
    oid = order["order_id"]

    status, seen, _ = await api.request("GET", f"/api/v1/orders/{oid}", headers=api.buyer("alice"))
    assert status == 200 and seen["status"] == "pending" and seen["payment_id"] is None
    status, _, _ = await api.request("GET", f"/api/v1/orders/{oid}", headers=api.buyer("bob"))
    assert status == 404

    await api.drain(sid)
    status, seen, _ = await api.request("GET", f"/api/v1/orders/{oid}", headers=api.buyer("alice"))
    assert status == 200 and seen["status"] == "awaiting_payment"
    assert (await api.ledger(sid))["consistent"] is True

    status, body, _ = await api.request(
        "POST", f"/api/v1/orders/{oid}/cancel", headers=api.buyer("bob")
    )
    assert status == 404 and body["error"]["code"] == "order_not_found"
    status, body, _ = await api.request(
        "POST", f"/api/v1/orders/{oid}/cancel", headers=api.buyer("alice")
    )
    assert status == 200 and body["status"] == "cancelled"
    status, body, _ = await api.request(
        "POST", f"/api/v1/orders/{oid}/cancel", headers=api.buyer("alice")
    )
    assert status == 409 and body["error"]["code"] == "order_not_cancellable"
    led = await api.ledger(sid)
    assert led["available"] == 5 and led["cancelled"] == 2 and led["consistent"] is True
    # the released quantity stops counting against the limit
    status, _ = await api.reserve(sid, "alice", 2)
    assert status == 202


async def test_replay_returns_first_response_and_reserves_nothing_more(api: Api) -> None:
    sid = (await api.create_sale(stock=3))["sale_id"]
    first = await api.reserve(sid, "carol", 1, key="same")
    for _ in range(5):
        assert await api.reserve(sid, "carol", 1, key="same") == first
    assert first[0] == 202
    status, body = await api.reserve(sid, "carol", None, key="same")  # {} means quantity 1
    assert (status, body) == first
    status, body = await api.reserve(sid, "carol", 2, key="same")
    assert status == 422 and body["error"]["code"] == "idempotency_key_reused"
    other = (await api.create_sale(stock=3))["sale_id"]
    status, body = await api.reserve(other, "carol", 1, key="same")
    assert status == 422 and body["error"]["code"] == "idempotency_key_reused"
    # the same key text from another buyer is another key
    status, _ = await api.reserve(sid, "dave", 1, key="same")
    assert status == 202
    led = await api.ledger(sid)
    assert led["available"] == 1 and led["pending"] == 2


async def test_conflicts_sold_out_limit_inactive(api: Api) -> None:
    sid = (await api.create_sale(stock=2, per_user_limit=2))["sale_id"]
    assert (await api.reserve(sid, "u1", 2))[0] == 202
    status, body = await api.reserve(sid, "u1", 1)
    assert status == 409 and body["error"]["code"] == "limit_exceeded"
    status, body = await api.reserve(sid, "u2", 1)
    assert status == 409 and body["error"]["code"] == "sold_out"
    sold_out_key = await api.reserve(sid, "u2", 1, key="so")
    assert sold_out_key[1]["error"]["code"] == "sold_out"
    assert (await api.request("GET", f"/api/v1/sales/{sid}"))[1]["status"] == "sold_out"

    later = datetime.now(UTC) + timedelta(hours=1)
    sched = await api.create_sale(stock=2, starts_at=later.isoformat())
    assert sched["status"] == "scheduled"
    status, body = await api.reserve(sched["sale_id"], "u1", 1)
    assert status == 409 and body["error"]["code"] == "sale_not_active"

    past = datetime.now(UTC) - timedelta(hours=2)
    ended = await api.create_sale(
        stock=2, starts_at=past.isoformat(), ends_at=(past + timedelta(hours=1)).isoformat()
    )
    assert ended["status"] == "ended"
    status, body = await api.reserve(ended["sale_id"], "u1", 1)
    assert status == 409 and body["error"]["code"] == "sale_not_active"

    status, body = await api.reserve("sl_000000000000", "u1", 1)
    assert status == 404 and body["error"]["code"] == "sale_not_found"


async def test_restock_reopens_a_sold_out_sale(api: Api) -> None:
    sid = (await api.create_sale(stock=1))["sale_id"]
    assert (await api.reserve(sid, "a", 1))[0] == 202
    assert (await api.reserve(sid, "b", 1))[1]["error"]["code"] == "sold_out"
    status, sale, _ = await api.request(
        "POST", f"/api/v1/sales/{sid}/restock", json={"quantity": 4}, headers=api.admin
    )
    assert status == 200 and sale["stock"] == 5 and sale["available"] == 4
    assert (await api.reserve(sid, "b", 1))[0] == 202
    await api.drain(sid)
    led = await api.ledger(sid)
    assert led == {**led, "stock": 5, "available": 3, "awaiting_payment": 2, "consistent": True}
