"""Orders as buyers see them: read and cancel, only ever their own.

A ``pending`` order lives in Redis until the consumer persists it; after
that PostgreSQL answers. Another buyer's order answers 404, exactly like an
unknown id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import asyncpg

from flashsale import errors, validate
from flashsale.core import record, release
from flashsale.core.clients import Conn
from flashsale.core.record import Order

if TYPE_CHECKING:
    from flashsale.core.backends import Backends

ORDER_COLUMNS = (
    "order_id, sale_id, user_id, quantity, amount_cents, status, expires_at, "
    "payment_id, shipment_id, tracking_number, idempotency_key, created_at"
)
CANCEL_RETRIES = 3


def render(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "order_id": row["order_id"], "sale_id": row["sale_id"], "user_id": row["user_id"],
        "quantity": row["quantity"], "amount_cents": row["amount_cents"],
        "status": row["status"], "expires_at": validate.iso(row["expires_at"]),
        "payment_id": row["payment_id"], "shipment_id": row["shipment_id"],
        "tracking_number": row["tracking_number"],
    }


async def fetch_row(
    b: Backends, order_id: str, conn: Conn | None = None
) -> asyncpg.Record | None:
    runner = conn if conn is not None else b.pg
    row: asyncpg.Record | None = await runner.fetchrow(
        f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1", order_id
    )
    return row


async def fetch_pending(b: Backends, order_id: str, sale_id: str) -> Order | None:
    """An accepted order still in Redis (its record in the pending hash)."""
    raw = await b.redis.hget(b.keys(sale_id).pending, order_id)
    if raw is None:
        return None
    return record.from_record(sale_id, order_id, raw)


def pending_body(o: Order) -> dict[str, Any]:
    return {**o.body(), "payment_id": None, "shipment_id": None, "tracking_number": None}


async def locate(
    b: Backends, order_id: str, user_id: str
) -> tuple[asyncpg.Record | None, Order | None]:
    """The order from PostgreSQL, else from Redis (pending), else PostgreSQL again
    (the consumer may have persisted it in between). 404 unless it is the buyer's."""
    sale_id = validate.order_sale_id(order_id)
    if sale_id is None:
        raise errors.OrderNotFound()
    row = await fetch_row(b, order_id)
    pending = None
    if row is None:
        pending = await fetch_pending(b, order_id, sale_id)
        if pending is None:
            row = await fetch_row(b, order_id)
    owner = row["user_id"] if row is not None else pending.user_id if pending else None
    if owner is None or owner != user_id:
        raise errors.OrderNotFound()
    return row, pending


async def get(b: Backends, order_id: str, user_id: str) -> dict[str, Any]:
    row, pending = await locate(b, order_id, user_id)
    if row is not None:
        return await with_payment_id(b, render(row))
    assert pending is not None
    return await with_payment_id(b, pending_body(pending))


async def with_payment_id(b: Backends, body: dict[str, Any]) -> dict[str, Any]:
    """Fill in the order's payment, requested perhaps before the order was persisted."""
    if body["payment_id"] is None:
        body["payment_id"] = await b.pg.fetchval(
            "SELECT payment_id FROM payments WHERE order_id = $1", body["order_id"]
        )
    return body


async def cancel(b: Backends, order_id: str, user_id: str) -> dict[str, Any]:
    actor = f"buyer:{user_id}"
    for _ in range(CANCEL_RETRIES):
        row, pending = await locate(b, order_id, user_id)
        if pending is not None:
            if not await release.release_unpersisted(
                b, [pending], "cancelled", actor, "cancelled while pending"
            ):
                continue  # persisted meanwhile: go again through PostgreSQL
        elif row is not None and await release.release(b, order_id, "cancelled", actor) is None:
            raise errors.OrderNotCancellable(
                f"an order in status {row['status']} cannot be cancelled"
            )
        final = await fetch_row(b, order_id)
        assert final is not None
        return await with_payment_id(b, render(final))
    raise errors.Unavailable("the order is changing; retry")
