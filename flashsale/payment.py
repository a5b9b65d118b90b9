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
order is never resurrected. An event for an order not persisted yet answers
503 (retryable) and changes nothing: the gateway retries, and by then the
consumer has written it (or the compensator has expired it).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from redis.exceptions import RedisError

from flashsale import compensate, errors, events, orders, validate
from flashsale.backends import Backends, Conn

log = logging.getLogger("flashsale.payment")

SIGNATURE_HEADER = "Flashsale-Signature"
SIGNATURE_HEADER_MAX_CHARS = 1024
SIGNATURES_MAX = 4
EVENT_ID_MAX_CHARS = 200
EVENT_TYPES = ("payment.succeeded", "payment.failed")
EVENT_FIELDS = frozenset({"event_id", "type", "payment_id", "order_id", "amount_cents"})
AMOUNT_MAX_CENTS = 10**15
PAY_RETRIES = 3
ACTOR = "webhook"
RELEASED = ("cancelled", "expired", "failed")


# --------------------------------------------------------------------------- signatures


def signature(secret: str, t: int, raw_body: bytes) -> str:
    """The header value a gateway sends: ``t=<t>,v1=<hex HMAC-SHA256>``."""
    mac = hmac.new(secret.encode(), str(t).encode() + b"." + raw_body, hashlib.sha256)
    return f"t={t},v1={mac.hexdigest()}"


def _parse_header(header: str) -> tuple[int, list[str]]:
    t: int | None = None
    v1: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise errors.InvalidSignature("the signature header is malformed")
        if name == "t" and t is None and value.isascii() and value.isdigit() and len(value) <= 12:
            t = int(value)
        elif name == "v1" and len(v1) < SIGNATURES_MAX:
            v1.append(value.lower())
    if t is None or not v1:
        raise errors.InvalidSignature("the signature header needs t=<unix seconds>,v1=<hex>")
    return t, v1


def verify(
    secret: str, header: str | None, raw_body: bytes, now_s: float, tolerance_s: int
) -> None:
    """Raise InvalidSignature unless ``header`` signs ``raw_body`` with ``secret``
    and its timestamp is within ``tolerance_s`` of ``now_s`` (past or future)."""
    if not header or len(header) > SIGNATURE_HEADER_MAX_CHARS:
        raise errors.InvalidSignature(f"the {SIGNATURE_HEADER} header is missing")
    t, candidates = _parse_header(header)
    if abs(now_s - t) > tolerance_s:
        raise errors.InvalidSignature("the signature timestamp is outside the tolerance")
    expected = signature(secret, t, raw_body).rsplit("=", 1)[1]
    matched = False
    for candidate in candidates:  # every candidate compared: no early exit
        matched |= hmac.compare_digest(expected.encode(), candidate.encode("ascii", "replace"))
    if not matched:
        raise errors.InvalidSignature("the signature does not match")


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
        body = validate.json_object(raw)
        validate.no_unknown(body, EVENT_FIELDS)
        kind = validate.text(body, "type", 1, 40)
        if kind not in EVENT_TYPES:
            raise errors.InvalidRequest(f"type must be one of {', '.join(EVENT_TYPES)}")
        return cls(
            event_id=validate.text(body, "event_id", 1, EVENT_ID_MAX_CHARS),
            type=kind,
            payment_id=validate.text(body, "payment_id", 1, 80),
            order_id=validate.text(body, "order_id", 1, 80),
            amount_cents=validate.integer(body, "amount_cents", 0, AMOUNT_MAX_CENTS),
        )

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


def _payable_now(row: asyncpg.Record | None, pending: orders.PendingOrder | None) -> None:
    now = datetime.now(UTC)
    if row is not None:
        if row["status"] != "awaiting_payment" or row["expires_at"] <= now:
            raise errors.OrderNotPayable(f"an order in status {row['status']} cannot be paid")
    elif pending is not None and pending.expires_ms <= now.timestamp() * 1000:
        raise errors.OrderNotPayable("the order's hold has expired")


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
    outcome: str  # paid | refunded | payment_failed | no_change | duplicate
    order_id: str
    sale_id: str | None = None
    payment_id: str | None = None
    amount_cents: int = 0
    released: compensate.Released | None = None


_INSERT_EVENT = """
INSERT INTO webhook_events (event_id, type, payment_id, order_id, payload)
VALUES ($1, $2, $3, $4, $5::jsonb)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""

_LOCK_ORDER = """
SELECT status, expires_at > now() AS live, sale_id FROM orders WHERE order_id = $1 FOR UPDATE
"""

_TAKE_PAYMENT = """
UPDATE payments SET status = 'succeeded', succeeded_at = now(), updated_at = now()
WHERE payment_id = $1 AND status IN ('requires_payment', 'failed')
RETURNING payment_id
"""

_MARK_PAID = """
WITH o AS (
    UPDATE orders SET status = 'paid', payment_id = $2, updated_at = now()
    WHERE order_id = $1 AND status = 'awaiting_payment' AND expires_at > now()
    RETURNING order_id
), s AS (
    INSERT INTO order_sagas (order_id) SELECT order_id FROM o ON CONFLICT DO NOTHING RETURNING 1
)
SELECT order_id FROM o
"""


async def process(b: Backends, ev: Event) -> Applied:
    """Apply one verified event exactly once (see the module docstring)."""
    try:
        applied = await _apply_in_tx(b, ev, order_gone=False)
    except _OrderMissing:
        if await _pending_in_redis(b, ev.order_id):
            raise errors.Unavailable("the order is not persisted yet; retry") from None
        applied = await _apply_in_tx(b, ev, order_gone=True)  # never will be: refund
    await _after_commit(b, applied)
    return applied


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
        if fresh is None:
            return Applied("duplicate", ev.order_id)
        if ev.type == "payment.failed":
            failed = await conn.fetchval(
                "UPDATE payments SET status = 'failed', updated_at = now() "
                "WHERE payment_id = $1 AND status = 'requires_payment' RETURNING 1",
                ev.payment_id,
            )
            applied = Applied("payment_failed" if failed else "no_change", ev.order_id)
        else:
            applied = await _succeeded(b, conn, ev, pay["sale_id"], order_gone=order_gone)
        await conn.execute(
            "UPDATE webhook_events SET outcome = $2 WHERE event_id = $1",
            ev.event_id, applied.outcome,
        )
        return applied


async def _succeeded(
    b: Backends, conn: Conn, ev: Event, sale_id: str, *, order_gone: bool
) -> Applied:
    order = await conn.fetchrow(_LOCK_ORDER, ev.order_id)  # orders first, then payments
    if order is None and not order_gone:
        raise _OrderMissing()
    if await conn.fetchval(_TAKE_PAYMENT, ev.payment_id) is None:
        return Applied("no_change", ev.order_id)  # settled already by another event
    if order is not None and order["status"] == "awaiting_payment" and order["live"]:
        await conn.fetchval(_MARK_PAID, ev.order_id, ev.payment_id)
        return Applied("paid", ev.order_id, sale_id, ev.payment_id, ev.amount_cents)
    released = None
    if order is None:
        reason = "order_missing"
    elif order["status"] == "awaiting_payment":  # past its hold, not swept yet: expire it now
        released = await compensate.release(
            b, ev.order_id, "expired", ACTOR, detail="hold expired before the payment",
            conn=conn,
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
        r = applied.released
        try:
            await compensate.release_in_redis(b, r.order_id, r.sale_id)
        except (RedisError, OSError) as exc:  # the compensator's outbox sweep finishes it
            log.warning("release of %s pending in Redis: %r", r.order_id, exc)
    if applied.outcome == "paid" and applied.sale_id is not None:
        await events.publish(b, [events.DomainEvent(
            "order_paid", applied.order_id, applied.sale_id,
            {"payment_id": applied.payment_id or "", "amount_cents": applied.amount_cents},
        )])
