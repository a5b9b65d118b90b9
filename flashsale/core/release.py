"""The release protocol: held stock goes back exactly once, whoever releases it.

A release is two steps, each exactly once:

1. PostgreSQL, in one statement: a guarded status transition (``WHERE status
   = ANY(...)``: whoever commits first wins a race -- expiry vs payment,
   cancel vs pay, two compensators -- and the loser changes nothing), the
   release row, and ``sold`` lowered by what the order had counted
   (``transition``, ``expire_due``); or, for an order the consumer has not
   persisted yet, its row inserted already released, with its release row
   (``record_unpersisted``: the consumer's later insert then does nothing).
2. Redis: the ``release`` script, guarded by the order's hold entry, then the
   release rows are marked done and the release announced (``in_redis``).

The release rows not marked done are the outbox: ``sweep_outbox`` (the
compensator's loop) retries them, so a crash or a Redis failure between 1
and 2 loses nothing, and the script's guard makes a retry harmless. A caller
that releases on behalf of a request uses ``release`` / ``release_unpersisted``
(both steps; a failure of step 2 is left to the outbox), or runs step 1 in
its own transaction and then ``finish``. Loops use ``in_redis`` directly: a
failure raises, the round is retried, and the outbox has the rest.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
from redis.exceptions import RedisError

from flashsale.core import events, record, scripts
from flashsale.core.clients import Conn
from flashsale.core.record import Order
from flashsale.core.statuses import RELEASABLE
from flashsale.ops import logs

if TYPE_CHECKING:
    from flashsale.core.backends import Backends

log = logging.getLogger("flashsale.core.release")

OUTBOX_GRACE_S = 1.0  # a release row younger than this is its releaser's to finish
RELEASE_CHUNK = 500  # order ids per release script call

Runner: TypeAlias = "Conn | asyncpg.Pool"  # a connection (the caller's transaction) or the pool

# What every step 1 of a persisted order ends with, after a CTE ``o`` of the
# orders it moved (order_id, sale_id, quantity): ``sold`` lowered per sale
# when ``$5`` (the order had counted in it), the release rows (reason $2,
# actor $3, detail $4), and the orders released.
_TAIL = """
per_sale AS (
    SELECT sale_id, sum(quantity) AS qty FROM o GROUP BY sale_id
), s AS (
    UPDATE sales SET sold = sales.sold - per_sale.qty FROM per_sale
    WHERE sales.sale_id = per_sale.sale_id AND $5::bool RETURNING 1
), r AS (
    INSERT INTO releases (order_id, sale_id, quantity, reason, actor, detail)
    SELECT order_id, sale_id, quantity, $2, $3, $4 FROM o
    RETURNING 1
)
SELECT order_id, sale_id, quantity FROM o
"""

_TRANSITION = """
WITH o AS (
    UPDATE orders SET status = $2, updated_at = now()
    WHERE order_id = ANY($1::text[]) AND status = ANY($6::text[])
    RETURNING order_id, sale_id, quantity
),""" + _TAIL

_EXPIRE_DUE = """
WITH due AS (
    SELECT order_id FROM orders
    WHERE status = 'awaiting_payment' AND expires_at <= now()
      -- a payment delivered while the hold was live, kept in the payment inbox
      -- until the order was persisted: the inbox applies it (paid), not expiry
      AND NOT EXISTS (
          SELECT 1 FROM payment_inbox i
          WHERE i.order_id = orders.order_id AND i.applied_at IS NULL
            AND i.type = 'payment.succeeded' AND i.received_at < orders.expires_at)
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), o AS (
    UPDATE orders SET status = $2, updated_at = now()
    FROM due WHERE orders.order_id = due.order_id
    RETURNING orders.order_id, orders.sale_id, orders.quantity
),""" + _TAIL


@dataclass(frozen=True, slots=True)
class Released:
    """An order step 1 released: its stock is to go back in Redis."""

    order_id: str
    sale_id: str
    quantity: int


def _released(rows: Iterable[asyncpg.Record]) -> list[Released]:
    return [Released(r["order_id"], r["sale_id"], r["quantity"]) for r in rows]


# --------------------------------------------------------------------------- step 1


async def transition(
    runner: Runner, order_id: str, reason: str, actor: str, *,
    from_statuses: tuple[str, ...] = RELEASABLE, detail: str | None = None,
    sold_counted: bool = True,
) -> Released | None:
    """Step 1 for a persisted order: ``from_statuses -> reason`` (cancelled,
    expired, failed), its release row, and ``sold`` lowered unless the order
    never counted in it (``sold_counted=False``: its final deduction was
    refused). Run it in the caller's transaction by passing its connection.
    None when the order is not in ``from_statuses`` (it lost the race)."""
    rows = await runner.fetch(
        _TRANSITION, [order_id], reason, actor, detail, sold_counted, list(from_statuses)
    )
    return _released(rows)[0] if rows else None


async def expire_due(runner: Runner, limit: int, actor: str) -> list[Released]:
    """Step 1 for up to ``limit`` holds past their expiry, in one statement
    (locked rows are skipped: another compensator has them)."""
    return _released(await runner.fetch(_EXPIRE_DUE, limit, "expired", actor, None, True))


async def record_unpersisted(
    runner: Runner, orders: Sequence[Order], reason: str, actor: str, detail: str
) -> set[str]:
    """Step 1 for orders not persisted yet: their rows inserted already released
    (with their release rows), in one statement, so the consumer's later
    insert does nothing and they never count as sold. Returns the ids
    inserted; the others had a row already (persisted, or released first)."""
    return {r["order_id"] for r in await record.insert(runner, orders, reason, actor, detail)}


# --------------------------------------------------------------------------- step 2


async def in_redis(b: Backends, orders: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Step 2 for (order_id, sale_id) pairs: return the stock in Redis (guarded,
    one ``release`` call per sale and chunk), then close their outbox rows in
    one statement and announce what went back. Returns order id -> quantity
    released (0: nothing held; -1: the sale is missing in Redis, so the row
    stays open for after the rebuild). Raises when Redis or PostgreSQL fails:
    the rows stay in the outbox."""
    per_sale: dict[str, list[str]] = defaultdict(list)
    for order_id, sale_id in orders:
        per_sale[sale_id].append(order_id)
    out: dict[str, int] = {}
    returned: list[tuple[str, str, int]] = []
    for sale_id, ids in per_sale.items():
        k = b.keys(sale_id)
        for i in range(0, len(ids), RELEASE_CHUNK):
            chunk = ids[i:i + RELEASE_CHUNK]
            qtys = scripts.released(
                await b.scripts.release(keys=[k.sale, k.users, k.holds], args=chunk))
            for order_id, qty in zip(chunk, qtys, strict=True):
                out[order_id] = qty
                if qty > 0:
                    returned.append((order_id, sale_id, qty))
    done = [order_id for order_id, qty in out.items()
            if qty != scripts.RELEASE_SALE_MISSING]
    if done:
        await b.pg.execute(
            "UPDATE releases SET redis_released_at = now() "
            "WHERE order_id = ANY($1::text[]) AND redis_released_at IS NULL",
            done,
        )
    if returned:  # the stock went back just now (once per order): tell the subscribers
        await events.publish_released(b, returned)
    return out


async def failed(b: Backends, orders: Sequence[Order]) -> None:
    """Step 2 for orders the consumer recorded failed (their final deduction
    refused, or a duplicate idempotency key), each logged with its ids."""
    for o in orders:
        with logs.context(sale=o.sale_id, order=o.order_id):
            log.warning("order %s failed when persisted; its hold is released", o.order_id)
    await in_redis(b, [(o.order_id, o.sale_id) for o in orders])


async def finish(b: Backends, released: Sequence[Released]) -> None:
    """Step 2 on behalf of a request, after step 1 committed: a failure is
    logged and left to the outbox sweep, never raised into the answer."""
    if not released:
        return
    try:
        await in_redis(b, [(r.order_id, r.sale_id) for r in released])
    except (RedisError, OSError, asyncpg.PostgresError) as exc:
        one = len(released) == 1
        with logs.context(sale=released[0].sale_id if one else None,
                          order=released[0].order_id if one else None):
            log.warning("release of %s left to the outbox: %r",
                        ", ".join(r.order_id for r in released[:5]), exc)


async def sweep_outbox(b: Backends, limit: int) -> int:
    """Step 2 for up to ``limit`` release rows not done past their grace (their
    releaser died or failed). Returns the rows tried."""
    rows = await b.pg.fetch(
        "SELECT order_id, sale_id FROM releases WHERE redis_released_at IS NULL "
        "AND created_at <= now() - make_interval(secs => $1) ORDER BY created_at LIMIT $2",
        OUTBOX_GRACE_S, limit,
    )
    await in_redis(b, [(r["order_id"], r["sale_id"]) for r in rows])
    return len(rows)


# --------------------------------------------------------------------------- both steps


async def release(
    b: Backends, order_id: str, reason: str, actor: str, *,
    from_statuses: tuple[str, ...] = RELEASABLE, detail: str | None = None,
) -> Released | None:
    """Both steps for a persisted order; None when it lost the race (nothing done)."""
    done = await transition(b.pg, order_id, reason, actor, from_statuses=from_statuses,
                            detail=detail)
    if done is not None:
        await finish(b, [done])
    return done


async def release_unpersisted(
    b: Backends, orders: Sequence[Order], reason: str, actor: str, detail: str
) -> set[str]:
    """Both steps for orders not persisted yet; returns the ids released (the
    others had a row already: persisted, or released first)."""
    inserted = await record_unpersisted(b.pg, orders, reason, actor, detail)
    await finish(b, [Released(o.order_id, o.sale_id, o.quantity)
                     for o in orders if o.order_id in inserted])
    return inserted
