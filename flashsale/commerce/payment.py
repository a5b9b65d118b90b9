"""Payments: one per order, requested by the buyer, settled by the gateway's webhook.

Requesting a payment (``POST /pay``) never changes the order: it inserts the
order's one payment (``ON CONFLICT DO NOTHING`` on the order id) or returns
the existing one. A ``pending`` order (still only in Redis) is payable too:
the payment row keeps the order's sale, buyer and amount itself.

The webhook is verified (HMAC-SHA256 over ``"<t>.<raw body>"``, constant-time
compare, ``t`` within the tolerance either way), parsed strictly, then applied
in ONE transaction that also inserts the event id (``ON CONFLICT DO NOTHING``):
a replayed event changes nothing. Rows are locked in a fixed order (the order,
then its payment). ``payment.succeeded`` moves ``awaiting_payment -> paid``
only while the hold is live (``expires_at > now()``): whoever commits first
wins against expiry and cancel. Money taken for an order that can no longer
take it (cancelled, expired, failed, never persisted) is refunded, and the
order is never resurrected.

An event for an order not persisted yet (``pending``, only in Redis) is kept
in the payment inbox (``payment_inbox``, unique on the event id: a replayed
delivery adds nothing) and answered 200 ``queued``: from then on the event is
ours, durably, whatever the gateway's retries do. The compensator's inbox
loop (``apply_inbox``, a bounded batch per round, exponential backoff capped
while the order is still pending) sends each kept event through the same
path as a delivery, ``_settle``: once the order is in PostgreSQL it is paid
(then shipped), or refunded if it was released first (expired, cancelled,
failed); if it is neither in PostgreSQL nor pending in Redis (dead-lettered,
lost) it never will be, and the payment is refunded (``order_missing``).
Exactly once: the application inserts the event id into ``webhook_events``
and closes the inbox row in one transaction. A kept event is judged as of
its delivery (``received_at``): a payment delivered while the hold was live
pays the order even if the hold ran out before the consumer caught up (the
expiry sweep leaves such an order to the inbox). Only a payment made through
``POST /pay`` can be settled, so an event naming any other order id (another
sale's, garbage) is refused with 400 and kept nowhere.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from redis.exceptions import RedisError

from flashsale import errors, validate
from flashsale.commerce import orders, payment_inbox
from flashsale.core import events, release
from flashsale.core.clients import Conn
from flashsale.core.record import Order
from flashsale.core.statuses import RELEASED
from flashsale.schemas.bodies import WebhookEvent
from flashsale.schemas.decode import BodyReader

if TYPE_CHECKING:
    from flashsale.core.backends import Backends

log = logging.getLogger("flashsale.commerce.payment")

READ_EVENT = BodyReader(WebhookEvent)
PAY_RETRIES = 3
ACTOR = "webhook"


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    type: str
    payment_id: str
    order_id: str
    amount_cents: int

    @classmethod
    def parse(cls, raw: bytes) -> Event:
        body = READ_EVENT(raw)  # the shape: flashsale/schemas/bodies.py
        return cls(body.event_id, body.type, body.payment_id, body.order_id, body.amount_cents)

    def payload(self) -> str:
        return orjson.dumps({
            "event_id": self.event_id, "type": self.type, "payment_id": self.payment_id,
            "order_id": self.order_id, "amount_cents": self.amount_cents,
        }).decode()


# --------------------------------------------------------------------------- requesting


@dataclass(frozen=True, slots=True)
class Payment:
    payment_id: str
    order_id: str
    sale_id: str
    user_id: str
    amount_cents: int
    status: str

    @classmethod
    def of(cls, row: asyncpg.Record) -> Payment:
        return cls(row["payment_id"], row["order_id"], row["sale_id"], row["user_id"],
                   row["amount_cents"], row["status"])

    def body(self) -> dict[str, Any]:
        return {"payment_id": self.payment_id, "order_id": self.order_id,
                "amount_cents": self.amount_cents, "status": self.status}


def new_payment_id() -> str:
    return "pay_" + secrets.token_hex(12)


_INSERT_PAYMENT = """
INSERT INTO payments (payment_id, order_id, sale_id, user_id, amount_cents)
SELECT $1, $2, $3, $4, $5
WHERE NOT EXISTS (
    SELECT 1 FROM orders WHERE order_id = $2
    AND NOT (status = 'awaiting_payment' AND expires_at > now()))
ON CONFLICT (order_id) DO NOTHING
RETURNING payment_id, order_id, sale_id, user_id, amount_cents, status
"""

_EXISTING = """
SELECT p.payment_id, p.order_id, p.sale_id, p.user_id, p.amount_cents, p.status,
       o.status AS order_status, o.expires_at > now() AS live
FROM (SELECT $1::text AS order_id) q
LEFT JOIN payments p ON p.order_id = q.order_id
LEFT JOIN orders o ON o.order_id = q.order_id
"""


def _payable_now(row: asyncpg.Record | None, pending: Order | None) -> None:
    now = datetime.now(UTC)
    if row is not None:
        if row["status"] != "awaiting_payment" or row["expires_at"] <= now:
            raise errors.OrderNotPayable(f"an order in status {row['status']} cannot be paid")
    elif pending is not None and pending.expires_ms <= now.timestamp() * 1000:
        raise errors.OrderNotPayable("the order's hold has expired")


async def order_of_payment(b: Backends, payment_id: str) -> tuple[str, int] | None:
    """The order id and amount a payment was created for, or None."""
    row = await b.pg.fetchrow(
        "SELECT order_id, amount_cents FROM payments WHERE payment_id = $1", payment_id
    )
    return None if row is None else (row["order_id"], row["amount_cents"])


async def request_payment(b: Backends, order_id: str, user_id: str) -> Payment:
    """The order's one payment, created on first request (404 unless the buyer's)."""
    row, pending = await orders.locate(b, order_id, user_id)
    _payable_now(row, pending)
    if row is not None:
        sale_id, amount = str(row["sale_id"]), int(row["amount_cents"])
    else:
        assert pending is not None
        sale_id, amount = pending.sale_id, pending.amount_cents
    for _ in range(PAY_RETRIES):
        made = await b.pg.fetchrow(
            _INSERT_PAYMENT, new_payment_id(), order_id, sale_id, user_id, amount
        )
        if made is not None:
            return Payment.of(made)
        found = await b.pg.fetchrow(_EXISTING, order_id)
        assert found is not None
        if found["order_status"] is not None and not (
            found["order_status"] == "awaiting_payment" and found["live"]
        ):
            raise errors.OrderNotPayable(
                f"an order in status {found['order_status']} cannot be paid"
            )
        if found["payment_id"] is None:
            continue  # a concurrent request's insert was not visible yet
        if found["status"] in ("succeeded", "refunded"):
            raise errors.OrderNotPayable("the order's payment is settled")
        if found["status"] == "failed":  # a failed attempt: the buyer tries again
            await b.pg.execute(
                "UPDATE payments SET status = 'requires_payment', updated_at = now() "
                "WHERE payment_id = $1 AND status = 'failed'", found["payment_id"],
            )
        return replace(Payment.of(found), status="requires_payment")
    raise errors.Unavailable("the order is changing; retry")


# --------------------------------------------------------------------------- refunds

_RECORD_REFUND = """
WITH p AS (
    UPDATE payments SET status = 'refunded', updated_at = now()
    WHERE order_id = $1 AND status = 'succeeded'
    RETURNING payment_id, order_id, amount_cents
)
INSERT INTO refunds (refund_id, payment_id, order_id, amount_cents, reason)
SELECT $2, payment_id, order_id, amount_cents, $3 FROM p
ON CONFLICT (payment_id) DO NOTHING
RETURNING refund_id
"""


async def record_refund(conn: Conn, order_id: str, reason: str) -> bool:
    """Decide to give back the money taken for the order (once per payment); the
    saga runner executes it at the gateway. False when nothing is to refund."""
    refund_id = "re_" + secrets.token_hex(12)
    return await conn.fetchval(_RECORD_REFUND, order_id, refund_id, reason) is not None


# --------------------------------------------------------------------------- the webhook


class _OrderMissing(Exception):
    """The order is not in PostgreSQL (yet): roll the whole event back."""


@dataclass(frozen=True, slots=True)
class Applied:
    outcome: str  # paid | refunded | payment_failed | no_change | duplicate | queued
    order_id: str
    sale_id: str | None = None
    payment_id: str | None = None
    amount_cents: int = 0
    released: release.Released | None = None


_INSERT_EVENT = """
INSERT INTO webhook_events (event_id, type, payment_id, order_id, payload)
VALUES ($1, $2, $3, $4, $5::jsonb)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""

# $2: when the event was delivered (an inbox event), else NULL: now
_LOCK_ORDER = """
SELECT status, expires_at > coalesce($2::timestamptz, now()) AS live, sale_id
FROM orders WHERE order_id = $1 FOR UPDATE
"""

_TAKE_PAYMENT = """
UPDATE payments SET status = 'succeeded', succeeded_at = now(), updated_at = now()
WHERE payment_id = $1 AND status IN ('requires_payment', 'failed')
RETURNING payment_id
"""

_MARK_PAID = """
WITH o AS (
    UPDATE orders SET status = 'paid', payment_id = $2, updated_at = now()
    WHERE order_id = $1 AND status = 'awaiting_payment'
      AND expires_at > coalesce($3::timestamptz, now())
    RETURNING order_id
), s AS (
    INSERT INTO order_sagas (order_id) SELECT order_id FROM o ON CONFLICT DO NOTHING RETURNING 1
)
SELECT order_id FROM o
"""


async def process(b: Backends, ev: Event) -> Applied:
    """Apply one verified event exactly once, or keep it in the inbox while its
    order is not persisted yet (see the module docstring)."""
    applied = await _settle(b, ev)
    if applied is None:
        kept = await payment_inbox.keep(
            b, ev.event_id, ev.type, ev.payment_id, ev.order_id, ev.amount_cents, ev.payload()
        )
        return Applied("queued" if kept else "duplicate", ev.order_id)
    await _after_commit(b, applied)
    return applied


async def _settle(b: Backends, ev: Event) -> Applied | None:
    """Apply the event now (committed); None while its order may still be
    persisted: pending in Redis, or Redis cannot tell."""
    try:
        return await _apply_in_tx(b, ev, order_gone=False)
    except _OrderMissing:
        pass
    try:
        if await _pending_in_redis(b, ev.order_id):
            return None
    except (RedisError, OSError) as exc:
        log.warning("order %s: Redis cannot tell whether it is pending (%r)", ev.order_id, exc)
        return None
    # not pending and (checked again under the lock) not in PostgreSQL: the
    # consumer acks only after its commit, so the order never will be: refund
    return await _apply_in_tx(b, ev, order_gone=True)


async def _apply_in_tx(b: Backends, ev: Event, *, order_gone: bool) -> Applied:
    async with b.pg.acquire() as conn, conn.transaction():
        pay = await conn.fetchrow(
            "SELECT order_id, sale_id, amount_cents FROM payments WHERE payment_id = $1",
            ev.payment_id,
        )
        if pay is None or pay["order_id"] != ev.order_id:
            raise errors.InvalidRequest("no such payment for this order")
        if pay["amount_cents"] != ev.amount_cents:
            raise errors.InvalidRequest("amount_cents does not match the payment")
        fresh = await conn.fetchval(
            _INSERT_EVENT, ev.event_id, ev.type, ev.payment_id, ev.order_id, ev.payload()
        )
        # kept in the inbox earlier: judged as of its delivery, closed in this commit
        kept_at = await payment_inbox.kept_at(conn, ev.event_id)
        if fresh is None:
            applied = Applied("duplicate", ev.order_id)
        elif ev.type == "payment.failed":
            failed = await conn.fetchval(
                "UPDATE payments SET status = 'failed', updated_at = now() "
                "WHERE payment_id = $1 AND status = 'requires_payment' RETURNING 1",
                ev.payment_id,
            )
            applied = Applied("payment_failed" if failed else "no_change", ev.order_id)
        else:
            applied = await _succeeded(
                b, conn, ev, pay["sale_id"], order_gone=order_gone, as_of=kept_at
            )
        if fresh is not None:
            await conn.execute(
                "UPDATE webhook_events SET outcome = $2 WHERE event_id = $1",
                ev.event_id, applied.outcome,
            )
        if kept_at is not None:
            await payment_inbox.mark_applied(conn, ev.event_id, applied.outcome)
        return applied


async def _succeeded(
    b: Backends, conn: Conn, ev: Event, sale_id: str, *, order_gone: bool,
    as_of: datetime | None,
) -> Applied:
    order = await conn.fetchrow(_LOCK_ORDER, ev.order_id, as_of)  # orders, then payments
    if order is None and not order_gone:
        raise _OrderMissing()
    if await conn.fetchval(_TAKE_PAYMENT, ev.payment_id) is None:
        return Applied("no_change", ev.order_id)  # settled already by another event
    if order is not None and order["status"] == "awaiting_payment" and order["live"]:
        await conn.fetchval(_MARK_PAID, ev.order_id, ev.payment_id, as_of)
        return Applied("paid", ev.order_id, sale_id, ev.payment_id, ev.amount_cents)
    released = None
    if order is None:
        reason = "order_missing"
    elif order["status"] == "awaiting_payment":  # past its hold, not swept yet: expire it now
        released = await release.transition(
            conn, ev.order_id, "expired", ACTOR, detail="hold expired before the payment"
        )
        reason = "order_expired"
    elif order["status"] in RELEASED:
        reason = f"order_{order['status']}"
    else:
        raise AssertionError(f"order {ev.order_id} is {order['status']} with an unpaid payment")
    await record_refund(conn, ev.order_id, reason)
    log.warning("payment %s for %s order %s: refund recorded", ev.payment_id, reason,
                ev.order_id)
    return Applied("refunded", ev.order_id, sale_id, ev.payment_id, ev.amount_cents, released)


async def _pending_in_redis(b: Backends, order_id: str) -> bool:
    sale_id = validate.order_sale_id(order_id)
    if sale_id is None:
        return False
    return bool(await b.redis.hexists(b.keys(sale_id).pending, order_id))


async def _after_commit(b: Backends, applied: Applied) -> None:
    if applied.released is not None:
        await release.finish(b, [applied.released])
    if applied.outcome == "paid" and applied.sale_id is not None:
        await events.publish(b, [events.DomainEvent(
            "order_paid", applied.order_id, applied.sale_id,
            {"payment_id": applied.payment_id or "", "amount_cents": applied.amount_cents},
        )])


# --------------------------------------------------------------------------- the inbox
# (its table and statements: commerce/payment_inbox.py)

async def apply_inbox(b: Backends) -> int:
    """One bounded round of the inbox: each due event goes through the webhook's
    own path again (``_settle``): applied once its order is in PostgreSQL (paid,
    or refunded if released), refunded when the order can never be persisted,
    else left for its next attempt. Returns the events attempted."""
    rows = await payment_inbox.claim(b)
    for r in rows:
        ev = Event(r["event_id"], r["type"], r["payment_id"], r["order_id"], r["amount_cents"])
        try:
            applied = await _settle(b, ev)
        except errors.InvalidRequest as exc:  # its payment no longer matches: never will
            log.error("inbox event %s rejected: %s", ev.event_id, exc.message)
            await payment_inbox.reject(b, ev.event_id, exc.message)
            continue
        except (asyncpg.PostgresError, RedisError, OSError) as exc:  # retried at its next attempt
            log.warning("inbox event %s: attempt failed (%r)", ev.event_id, exc)
            await payment_inbox.note_error(b, ev.event_id, repr(exc))
            continue
        if applied is not None:
            await _after_commit(b, applied)
    return len(rows)
