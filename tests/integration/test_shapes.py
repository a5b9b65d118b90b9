"""Every body the server answers fits the shape the OpenAPI document publishes for it.

The handlers build their bodies as dicts; the document's schemas come from
the response shapes (flashsale/schemas/responses.py). Each answer of a full
order's life, through real HTTP, Redis and PostgreSQL, is converted through
its shape in msgspec's strict mode (exact types, no unknown field, every
required field): a field added to a body and not to its shape, or the other
way round, fails here.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from openapi_schema_validator import OAS31Validator

from flashsale.room.admitter import Admitter
from flashsale.schemas import bounds, responses
from tests.support import Api


def fits(shape: type[Any], body: Any) -> None:
    try:
        msgspec.convert(body, shape, strict=True)
    except msgspec.ValidationError as exc:
        raise AssertionError(f"{shape.__name__}: {exc}\n{body!r}") from None


async def test_every_answer_fits_its_shape(api: Api) -> None:
    sale = await api.create_sale(stock=5, per_user_limit=5, price_cents=250)
    fits(responses.Sale, sale)
    sid = sale["sale_id"]
    status, body, _ = await api.request("GET", f"/api/v1/sales/{sid}")
    assert status == 200
    fits(responses.Sale, body)
    status, body, _ = await api.request(
        "POST", f"/api/v1/sales/{sid}/restock", json={"quantity": 2}, headers=api.admin
    )
    assert status == 200
    fits(responses.Sale, body)

    status, accepted = await api.reserve(sid, "alice", 2, key="k-1")
    assert status == 202
    fits(responses.OrderAccepted, accepted)
    oid = accepted["order_id"]
    alice = api.buyer("alice")
    status, body, _ = await api.request("GET", f"/api/v1/orders/{oid}", headers=alice)
    assert status == 200 and body["status"] == "pending"
    fits(responses.Order, body)
    await api.drain(sid)
    status, body, _ = await api.request("GET", f"/api/v1/orders/{oid}", headers=alice)
    assert status == 200 and body["status"] == "awaiting_payment"
    fits(responses.Order, body)

    status, pay, _ = await api.request("POST", f"/api/v1/orders/{oid}/pay", headers=alice)
    assert status == 201
    fits(responses.Payment, pay)
    status, settled, _ = await api.request(
        "POST", f"/api/v1/admin/gateway/payments/{pay['payment_id']}/settle",
        json={"outcome": "succeeded"}, headers=api.admin,
    )
    assert status == 200, settled
    fits(responses.Settlement, settled)
    fits(responses.WebhookAck, settled["webhook_response"])

    status, other = await api.reserve(sid, "bob", 1)
    assert status == 202
    status, body, _ = await api.request(
        "POST", f"/api/v1/orders/{other['order_id']}/cancel", headers=api.buyer("bob")
    )
    assert status == 200 and body["status"] == "cancelled"
    fits(responses.Order, body)

    fits(responses.Ledger, await api.ledger(sid))
    status, body, _ = await api.request("POST", f"/api/v1/sales/{sid}/end", headers=api.admin)
    assert status == 200 and body["status"] == "ended"
    fits(responses.Sale, body)

    status, body, _ = await api.request("GET", "/healthz")
    fits(responses.Health, body)
    status, body, _ = await api.request("GET", "/readyz")
    fits(responses.Readiness, body)
    status, body, _ = await api.request("GET", f"/api/v1/orders/{oid}", headers=api.buyer("eve"))
    assert status == 404
    fits(responses.Error, body)


_BETWEEN = f"quantity must be between 1 and {bounds.MAX_QUANTITY}"
_NOT_INT = "quantity must be an integer"


@pytest.mark.parametrize(
    ("what", "raw", "status", "message"),
    [
        # JSON Schema's integer, the rule the document states: a zero fraction is the integer
        ("order", b'{"quantity": 2}', 202, None),
        ("order", b'{"quantity": 2.0}', 202, None),
        ("order", b'{"quantity": 2e0}', 202, None),
        ("order", b'{"quantity": 1000000.0}', 202, None),
        ("order", b'{"quantity": 1e6}', 202, None),
        ("order", b'{"quantity": 2.5}', 400, _NOT_INT),
        ("order", b'{"quantity": 2.000001}', 400, _NOT_INT),
        ("order", b'{"quantity": "2"}', 400, _NOT_INT),
        ("order", b'{"quantity": true}', 400, _NOT_INT),
        ("order", b'{"quantity": 1000001}', 400, _BETWEEN),
        ("order", b'{"quantity": 1000001.0}', 400, _BETWEEN),
        ("order", b'{"quantity": 0.0}', 400, _BETWEEN),
        ("restock", b'{"quantity": 3.0}', 200, None),
        ("restock", b'{"quantity": 3.5}', 400, _NOT_INT),
    ],
)
async def test_integer_rule_is_the_published_one(
    api: Api, what: str, raw: bytes, status: int, message: str | None
) -> None:
    """The server accepts exactly the integers the OpenAPI document's schema accepts."""
    sale = await api.create_sale(stock=bounds.MAX_QUANTITY, per_user_limit=bounds.MAX_QUANTITY)
    path, headers = (
        (f"/api/v1/sales/{sale['sale_id']}/orders", api.buyer("carol")) if what == "order"
        else (f"/api/v1/sales/{sale['sale_id']}/restock", api.admin)
    )
    got, body, _ = await api.request("POST", path, data=raw, headers=headers)
    assert got == status, body
    if message is not None:
        assert body == {"error": {"code": "invalid_request", "message": message}}
    elif what == "order":  # the order holds the integer, written as one
        assert body["quantity"] == int(json.loads(raw)["quantity"])
        assert type(body["quantity"]) is int
    _, doc, _ = await api.request("GET", "/openapi.json")
    schema = doc["paths"][path.replace(sale["sale_id"], "{sale_id}")]["post"]["requestBody"]
    validator = OAS31Validator({**schema["content"]["application/json"]["schema"],
                                "components": doc["components"]})
    assert validator.is_valid(json.loads(raw)) == (got < 400), (raw, got)


async def test_every_waiting_room_answer_fits_its_shape(api: Api) -> None:
    """The room's bodies (contract v1.1): the sale with its room, a ticket waiting and
    admitted, the admin GET and PATCH."""
    sale = await api.create_sale(stock=3, waiting_room={"admit_per_s": 1000, "oversubscribe": 1.5})
    fits(responses.Sale, sale)
    assert sale["waiting_room"] == {"admit_per_s": 1000, "pass_seconds": 300,
                                    "oversubscribe": 1.5}
    sid = sale["sale_id"]
    dave = api.buyer("dave")
    status, ticket, _ = await api.request("POST", f"/api/v1/sales/{sid}/queue", headers=dave)
    assert status == 201 and ticket["state"] == "waiting", ticket
    fits(responses.Ticket, ticket)
    path = f"/api/v1/admin/sales/{sid}/waiting-room"
    status, figures, _ = await api.request("GET", path, headers=api.admin)
    assert status == 200
    fits(responses.WaitingRoomFigures, figures)
    await Admitter(api.backends).step(sid)
    status, ticket, _ = await api.request(
        "GET", f"/api/v1/sales/{sid}/queue/{ticket['ticket_id']}", headers=dave
    )
    assert status == 200 and ticket["state"] == "admitted" and ticket["pass"], ticket
    fits(responses.Ticket, ticket)
    status, figures, _ = await api.request("PATCH", path, headers=api.admin,
                                           json={"paused": True})
    assert status == 200 and figures["paused"] is True
    fits(responses.WaitingRoomFigures, figures)
    status, body, _ = await api.request("PATCH", path, headers=api.admin,
                                        json={"admit_per_s": 0})
    assert status == 400 and body == {"error": {
        "code": "invalid_request", "message": "admit_per_s must be between 1 and 100000"}}
    status, body, _ = await api.request(
        "POST", "/api/v1/sales", headers=api.admin,
        json={"sku": "S", "name": "n", "price_cents": 1, "stock": 1,
              "waiting_room": {"admit_per_s": 5, "pass_seconds": 9}},
    )
    assert status == 400 and body == {"error": {
        "code": "invalid_request",
        "message": "waiting_room.pass_seconds must be between 10 and 3600"}}
