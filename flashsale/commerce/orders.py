"""Orders as buyers see them: read and cancel, only ever their own.

A ``pending`` order lives in Redis until the consumer persists it; after
that PostgreSQL answers. Another buyer's order answers 404, exactly like an
unknown id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from flashsale import errors, validate
from flashsale.core import compensate
from flashsale.core.backends import Backends, Conn

ORDER_COLUMNS = (
    "order_id, sale_id, user_id, quantity, amount_cents, status, expires_at, "
    "payment_id, shipment_id, tracking_number, idempotency_key, created_at"
)
CANCEL_RETRIES = 3


@dataclass(frozen=True, slots=True)
class PendingOrder(compensate.Unpersisted):
    """An accepted order still in Redis (see lua/reserve_batch-6.lua, pending hash)."""

    @classmethod
    def parse(cls, order_id: str, sale_id: str, raw: str) -> PendingOrder:
        user, qty, amount, expires, created, key = raw.split("\t", 5)
        return cls(order_id, sale_id, user, int(qty), int(amount), int(created), int(expires),
                   key or None)

    def body(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id, "sale_id": self.sale_id, "user_id": self.user_id,
            "quantity": self.quantity, "amount_cents": self.amount_cents, "status": "pending",
            "expires_at": validate.iso_ms(self.expires_ms), "payment_id": None,
            "shipment_id": None, "tracking_number": None,
        }


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


async def fetch_pending(b: Backends, order_id: str, sale_id: str) -> PendingOrder | None:
    raw = await b.redis.hget(b.keys(sale_id).pending, order_id)
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return PendingOrder.parse(order_id, sale_id, text)


async def locate(
    b: Backends, order_id: str, user_id: str
) -> tuple[asyncpg.Record | None, PendingOrder | None]:
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
    return await with_payment_id(b, pending.body())


async def with_payment_id(b: Backends, body: dict[str, Any]) -> dict[str, Any]:
    """Fill in the order's payment, requested perhaps before the order was persisted."""
    if body["payment_id"] is None:
        body["payment_id"] = await b.pg.fetchval(
            "SELECT payment_id FROM payments WHERE order_id = $1", body["order_id"]
        )
    return body


async def _cancel_pending(b: Backends, p: PendingOrder) -> bool:
    """Record a pending order as cancelled before the consumer persists it."""
    return await compensate.release_unpersisted(
        b, p, "cancelled", f"buyer:{p.user_id}", "cancelled while pending"
    )


async def cancel(b: Backends, order_id: str, user_id: str) -> dict[str, Any]:
    for _ in range(CANCEL_RETRIES):
        row, pending = await locate(b, order_id, user_id)
        if pending is not None:
            if not await _cancel_pending(b, pending):
                continue  # persisted meanwhile: go again through PostgreSQL
        elif row is not None:
            done = await compensate.release(
                b, order_id, "cancelled", f"buyer:{user_id}", from_statuses=("awaiting_payment",)
            )
            if done is None:
                raise errors.OrderNotCancellable(
                    f"an order in status {row['status']} cannot be cancelled"
                )
        sale_id = validate.order_sale_id(order_id)
        assert sale_id is not None
        await compensate.release_in_redis(b, order_id, sale_id)
        final = await fetch_row(b, order_id)
        assert final is not None
        return await with_payment_id(b, render(final))
    raise errors.Unavailable("the order is changing; retry")
