"""The fulfilment saga: what happens to an order after the reservation core.

    step                         done by                  compensation
    placed, stock held (Redis)   reserve_batch-8.lua        release (cancel, expiry)
    stock deducted (sold += q)   the consumer             release (final deduction failed)
    paid                         the webhook              refund (+ release, below)
    shipped                      this runner, carrier     (last step)

A ``payment.succeeded`` commits ``paid`` together with an ``order_sagas`` row
(step ``ship``). This runner books the shipment with the carrier behind its
circuit breaker; a failure is retried with exponential backoff, each attempt
counted and scheduled in the row, so a crash resumes where it stopped (the
row is leased by pushing ``next_attempt_at`` ahead while a runner works on
it, and the carrier books idempotently by order id). After
``carrier_attempts_max`` failed attempts the saga compensates in one
transaction: the order ``paid -> failed`` (its stock released, ``sold``
lowered, detail 'shipment failed') and a refund recorded. Calls refused by
an open breaker fail fast and do not count as attempts.

Refunds are an outbox too: each ``refunds`` row is executed at the gateway
(behind its breaker) with bounded retries and backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flashsale.commerce import payment
from flashsale.commerce.breaker import CircuitOpen
from flashsale.commerce.integrations import Integrations
from flashsale.commerce.logistics import Booking
from flashsale.core import events, release

if TYPE_CHECKING:
    from flashsale.core.backends import Backends

log = logging.getLogger("flashsale.commerce.saga")

POSTPONE_MIN_S = 0.05
ERROR_MAX_CHARS = 500

_CLAIM_SHIPMENTS = """
WITH due AS (
    SELECT order_id FROM order_sagas
    WHERE step = 'ship' AND next_attempt_at <= now()
    ORDER BY next_attempt_at LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE order_sagas s SET attempts = s.attempts + 1, updated_at = now(),
    next_attempt_at = now() + make_interval(secs => $2)
FROM due, orders o
WHERE s.order_id = due.order_id AND o.order_id = s.order_id
RETURNING s.order_id, s.attempts, o.sale_id, o.quantity
"""

_CLAIM_REFUNDS = """
WITH due AS (
    SELECT refund_id FROM refunds
    WHERE status = 'requested' AND next_attempt_at <= now()
    ORDER BY next_attempt_at LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE refunds r SET attempts = r.attempts + 1,
    next_attempt_at = now() + make_interval(secs => $2)
FROM due WHERE r.refund_id = due.refund_id
RETURNING r.refund_id, r.payment_id, r.amount_cents, r.attempts
"""

_SHIPPED = """
WITH o AS (
    UPDATE orders SET status = 'shipped', shipment_id = $2, tracking_number = $3,
                      updated_at = now()
    WHERE order_id = $1 AND status = 'paid'
    RETURNING order_id
), sh AS (
    INSERT INTO shipments (order_id, shipment_id, tracking_number, status, attempts)
    SELECT order_id, $2, $3, 'booked', $4 FROM o
    ON CONFLICT (order_id) DO NOTHING
    RETURNING 1
), sg AS (
    UPDATE order_sagas SET step = 'done', last_error = NULL, updated_at = now()
    WHERE order_id = $1 AND step = 'ship'
    RETURNING 1
)
SELECT order_id FROM o
"""

# table -> its key column (the two outboxes this runner works through)
_KEYS = {"order_sagas": "order_id", "refunds": "refund_id"}


@dataclass(frozen=True, slots=True)
class Claimed:
    order_id: str
    sale_id: str
    quantity: int
    attempts: int


class SagaRunner:
    """Books shipments of paid orders and executes refunds; ``step()`` is one bounded round."""

    def __init__(
        self, backends: Backends, integrations: Integrations, name: str = "saga"
    ) -> None:
        self._b = backends
        self._i = integrations
        self.name = name

    async def run(self, stop: asyncio.Event) -> None:
        interval_s = self._b.settings.saga_interval_s
        while not stop.is_set():
            try:
                await self.step()
            except Exception as exc:  # the loop must outlive any failure
                log.warning("saga step failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    async def step(self) -> int:
        return await self.ship_due() + await self.refund_due()

    # ----------------------------------------------------------------------- shipments

    async def ship_due(self) -> int:
        s = self._b.settings
        rows = await self._b.pg.fetch(_CLAIM_SHIPMENTS, s.saga_batch_max, float(s.saga_lease_s))
        for r in rows:
            await self._ship(Claimed(r["order_id"], r["sale_id"], r["quantity"], r["attempts"]))
        return len(rows)

    async def _ship(self, c: Claimed) -> None:
        carrier, breaker = self._i.carrier, self._i.carrier_breaker
        try:
            booking = await breaker.call(lambda: carrier.book(c.order_id, c.quantity))
        except CircuitOpen as exc:
            await self._postpone("order_sagas", c.order_id, exc.retry_after_s, str(exc))
            return
        except Exception as exc:  # whatever the carrier did, it is a failed attempt
            error = f"{type(exc).__name__}: {exc}"
            if c.attempts >= self._b.settings.carrier_attempts_max:
                await self._give_up(c, error)
            else:
                await self._retry("order_sagas", c.order_id, c.attempts, error)
            return
        await self._shipped(c, booking)

    async def _shipped(self, c: Claimed, booking: Booking) -> None:
        done = await self._b.pg.fetchval(
            _SHIPPED, c.order_id, booking.shipment_id, booking.tracking_number, c.attempts
        )
        if done is not None:
            log.info("order %s shipped: %s", c.order_id, booking.tracking_number)
            await events.publish(self._b, [events.DomainEvent(
                "order_shipped", c.order_id, c.sale_id,
                {"shipment_id": booking.shipment_id,
                 "tracking_number": booking.tracking_number},
            )])

    async def _give_up(self, c: Claimed, error: str) -> None:
        """Compensate: paid -> failed (stock released, sold lowered) and a refund, at once."""
        b = self._b
        async with b.pg.acquire() as conn, conn.transaction():
            released = await release.transition(
                conn, c.order_id, "failed", self.name, from_statuses=("paid",),
                detail="shipment failed",
            )
            if released is not None:
                await payment.record_refund(conn, c.order_id, "shipment_failed")
                await conn.execute(
                    "INSERT INTO shipments (order_id, status, attempts) VALUES ($1, 'failed', $2) "
                    "ON CONFLICT (order_id) DO NOTHING", c.order_id, c.attempts,
                )
            await conn.execute(
                "UPDATE order_sagas SET step = 'compensated', last_error = $2, updated_at = now() "
                "WHERE order_id = $1 AND step = 'ship'", c.order_id, error[:ERROR_MAX_CHARS],
            )
        log.error("order %s: shipment failed after %d attempts (%s); refunded and released",
                  c.order_id, c.attempts, error)
        if released is not None:
            await release.finish(b, [released])

    # ----------------------------------------------------------------------- refunds

    async def refund_due(self) -> int:
        s = self._b.settings
        rows = await self._b.pg.fetch(_CLAIM_REFUNDS, s.saga_batch_max, float(s.saga_lease_s))
        for r in rows:
            await self._refund(r["refund_id"], r["payment_id"], r["amount_cents"], r["attempts"])
        return len(rows)

    async def _refund(self, refund_id: str, payment_id: str, amount: int, attempts: int) -> None:
        gateway, breaker = self._i.gateway, self._i.gateway_breaker
        try:
            gateway_id = await breaker.call(lambda: gateway.refund(payment_id, amount))
        except CircuitOpen as exc:
            await self._postpone("refunds", refund_id, exc.retry_after_s, str(exc))
            return
        except Exception as exc:  # whatever the gateway did, it is a failed attempt
            error = f"{type(exc).__name__}: {exc}"
            if attempts < self._b.settings.refund_attempts_max:
                await self._retry("refunds", refund_id, attempts, error)
                return
            log.error("refund %s of payment %s failed %d times: needs an operator (%s)",
                      refund_id, payment_id, attempts, error)
            await self._b.pg.execute(
                "UPDATE refunds SET status = 'failed', completed_at = now(), last_error = $2 "
                "WHERE refund_id = $1 AND status = 'requested'", refund_id,
                error[:ERROR_MAX_CHARS],
            )
            return
        await self._b.pg.execute(
            "UPDATE refunds SET status = 'succeeded', completed_at = now(), last_error = NULL, "
            "gateway_refund_id = $2 WHERE refund_id = $1 AND status = 'requested'",
            refund_id, gateway_id,
        )

    # ----------------------------------------------------------------------- scheduling

    def backoff_s(self, attempts: int) -> float:
        s = self._b.settings
        return float(min(s.saga_backoff_max_s, s.saga_backoff_base_s * 2 ** max(0, attempts - 1)))

    async def _retry(self, table: str, key: str, attempts: int, error: str) -> None:
        delay_s = self.backoff_s(attempts)
        log.warning("%s %s: attempt %d failed (%s); next in %.2fs", table, key, attempts, error,
                    delay_s)
        await self._b.pg.execute(
            f"UPDATE {table} SET next_attempt_at = now() + make_interval(secs => $2), "
            f"last_error = $3 WHERE {_KEYS[table]} = $1", key, delay_s, error[:ERROR_MAX_CHARS],
        )

    async def _postpone(self, table: str, key: str, delay_s: float, error: str) -> None:
        """The breaker refused the call: try again when it half-opens; not an attempt."""
        await self._b.pg.execute(
            f"UPDATE {table} SET attempts = greatest(attempts - 1, 0), "
            f"next_attempt_at = now() + make_interval(secs => $2), last_error = $3 "
            f"WHERE {_KEYS[table]} = $1", key, max(POSTPONE_MIN_S, delay_s),
            error[:ERROR_MAX_CHARS],
        )
