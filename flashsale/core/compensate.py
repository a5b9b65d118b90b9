"""Compensation: every release of held stock happens exactly once.

A release is two steps, each exactly once:
1. PostgreSQL: a guarded status transition (``WHERE status = ANY(...)``) and a
   ``releases`` row, in one statement. Whoever commits first wins a race
   (expiry vs payment, cancel vs pay, two compensators); the loser changes
   nothing.
2. Redis: the ``release`` script, guarded by the order's hold entry, then the
   release row is marked done. The ``releases`` rows not yet marked are an
   outbox: the compensator retries them, so a crash between 1 and 2 loses
   nothing and the script's guard makes the retry harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from flashsale.core import events, live_sales, sales
from flashsale.core.backends import Backends, Conn, as_text
from flashsale.core.statuses import RELEASABLE as HOLDING  # awaiting_payment: what a release takes
from flashsale.ops.metrics import Metrics

log = logging.getLogger("flashsale.core.compensate")

OUTBOX_GRACE_S = 1.0
RELEASE_CHUNK = 500  # order ids per release script call

_RELEASE = """
WITH o AS (
    UPDATE orders SET status = $2, updated_at = now()
    WHERE order_id = $1 AND status = ANY($3::text[])
    RETURNING order_id, sale_id, quantity
), s AS (
    UPDATE sales SET sold = sales.sold - o.quantity FROM o WHERE sales.sale_id = o.sale_id
    RETURNING 1
), r AS (
    INSERT INTO releases (order_id, sale_id, quantity, reason, actor, detail)
    SELECT order_id, sale_id, quantity, $2, $4, $5 FROM o
    RETURNING 1
)
SELECT order_id, sale_id, quantity FROM o
"""

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
    UPDATE orders SET status = 'expired', updated_at = now()
    FROM due WHERE orders.order_id = due.order_id
    RETURNING orders.order_id, orders.sale_id, orders.quantity
), per_sale AS (
    SELECT sale_id, sum(quantity) AS qty FROM o GROUP BY sale_id
), s AS (
    UPDATE sales SET sold = sales.sold - per_sale.qty FROM per_sale
    WHERE sales.sale_id = per_sale.sale_id RETURNING 1
), r AS (
    INSERT INTO releases (order_id, sale_id, quantity, reason, actor)
    SELECT order_id, sale_id, quantity, 'expired', $2 FROM o
    RETURNING 1
)
SELECT order_id, sale_id, quantity FROM o
"""


_RELEASE_UNPERSISTED = """
WITH o AS (
    INSERT INTO orders (order_id, sale_id, user_id, quantity, amount_cents, status,
                        idempotency_key, created_at, expires_at)
    SELECT o, s, u, q, a, $6, k, to_timestamp(c::float8 / 1000), to_timestamp(e::float8 / 1000)
    FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[], $7::text[],
                $8::bigint[], $9::bigint[]) AS t(o, s, u, q, a, k, c, e)
    ON CONFLICT DO NOTHING
    RETURNING order_id, sale_id, quantity
), r AS (
    INSERT INTO releases (order_id, sale_id, quantity, reason, actor, detail)
    SELECT order_id, sale_id, quantity, $6, $10, $11 FROM o
    RETURNING 1
)
SELECT order_id FROM o
"""


@dataclass(frozen=True, slots=True)
class Unpersisted:
    """An accepted order the consumer has not written to PostgreSQL yet."""

    order_id: str
    sale_id: str
    user_id: str
    quantity: int
    amount_cents: int
    created_ms: int
    expires_ms: int
    idempotency_key: str | None


async def release_unpersisted(
    b: Backends, o: Unpersisted, reason: str, actor: str, detail: str
) -> bool:
    """Step 1 for an order not yet persisted: insert it already released (with
    its release row). The consumer's later insert then does nothing, so the
    order never counts as sold. False when the order row exists already."""
    return bool(await release_many_unpersisted(b, [o], reason, actor, detail))


async def release_many_unpersisted(
    b: Backends, orders: Sequence[Unpersisted], reason: str, actor: str, detail: str
) -> set[str]:
    """release_unpersisted for many orders in one statement; returns the ids
    inserted (the others had a row already)."""
    if not orders:
        return set()
    rows = await b.pg.fetch(
        _RELEASE_UNPERSISTED,
        [o.order_id for o in orders], [o.sale_id for o in orders],
        [o.user_id for o in orders], [o.quantity for o in orders],
        [o.amount_cents for o in orders], reason, [o.idempotency_key for o in orders],
        [o.created_ms for o in orders], [o.expires_ms for o in orders], actor, detail,
    )
    return {r["order_id"] for r in rows}


@dataclass(frozen=True, slots=True)
class Released:
    order_id: str
    sale_id: str
    quantity: int


async def release_in_redis(b: Backends, order_id: str, sale_id: str) -> int:
    """Step 2 for one order; see release_many_in_redis."""
    return (await release_many_in_redis(b, [(order_id, sale_id)]))[order_id]


async def release_many_in_redis(
    b: Backends, orders: Sequence[tuple[str, str]]
) -> dict[str, int]:
    """Step 2 for (order_id, sale_id) pairs: return the stock in Redis (guarded,
    one ``release`` call per sale and chunk), then close their outbox rows in
    one statement and announce what went back. Returns order id -> quantity
    released (0: nothing held; -1: the sale is missing in Redis, so the row
    stays open for after the rebuild)."""
    per_sale: dict[str, list[str]] = defaultdict(list)
    for order_id, sale_id in orders:
        per_sale[sale_id].append(order_id)
    out: dict[str, int] = {}
    returned: list[tuple[str, str, int]] = []
    for sale_id, ids in per_sale.items():
        k = b.keys(sale_id)
        for i in range(0, len(ids), RELEASE_CHUNK):
            chunk = ids[i:i + RELEASE_CHUNK]
            qtys = await b.scripts.release(keys=[k.sale, k.users, k.holds], args=chunk)
            for order_id, raw in zip(chunk, qtys, strict=True):
                qty = out[order_id] = int(raw)
                if qty > 0:
                    returned.append((order_id, sale_id, qty))
    done = [order_id for order_id, qty in out.items() if qty >= 0]
    if done:
        await b.pg.execute(
            "UPDATE releases SET redis_released_at = now() "
            "WHERE order_id = ANY($1::text[]) AND redis_released_at IS NULL",
            done,
        )
    if returned:  # the stock went back just now (once per order): tell the subscribers
        await events.publish_released(b, returned)
    return out


async def release(
    b: Backends,
    order_id: str,
    reason: str,
    actor: str,
    *,
    from_statuses: tuple[str, ...] = HOLDING,
    detail: str | None = None,
    conn: Conn | None = None,
) -> Released | None:
    """Step 1 (guarded transition + release row); None when it lost the race."""
    runner = conn if conn is not None else b.pg
    row = await runner.fetchrow(_RELEASE, order_id, reason, list(from_statuses), actor, detail)
    if row is None:
        return None
    return Released(row["order_id"], row["sale_id"], row["quantity"])


async def release_and_return(
    b: Backends, order_id: str, reason: str, actor: str, *, detail: str | None = None,
    from_statuses: tuple[str, ...] = HOLDING, metrics: Metrics | None = None,
) -> Released | None:
    done = await release(b, order_id, reason, actor, from_statuses=from_statuses, detail=detail)
    if done is not None:
        try:
            await release_in_redis(b, done.order_id, done.sale_id)
        except (RedisError, OSError) as exc:  # the outbox sweep finishes it
            log.warning("release of %s pending in Redis: %r", order_id, exc)
        if metrics is not None:
            metrics.releases.labels(reason).inc()
    return done


class Compensator:
    """Expires unpaid holds and finishes every release and restock in Redis."""

    def __init__(self, backends: Backends, metrics: Metrics, name: str = "compensator") -> None:
        self._b = backends
        self._m = metrics
        self.name = name
        self._unpersisted_cursor: dict[str, str] = {}  # sale id -> XRANGE start

    async def run(self, stop: asyncio.Event) -> None:
        interval = self._b.settings.compensator_interval_s
        while not stop.is_set():
            backlog = False
            try:
                _done, backlog = await self._round()
            except Exception as exc:  # the loop must outlive any failure; bounded backoff
                log.warning("compensator step failed: %r", exc)
            if backlog:  # a full batch: more is due now (mass expiry after a spike)
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def step(self) -> int:
        """One bounded round; returns the number of releases finished in Redis."""
        done, _backlog = await self._round()
        return done

    async def _round(self) -> tuple[int, bool]:
        """One bounded round: releases finished in Redis, and whether a batch
        came back full (work is left)."""
        full = self._b.settings.compensator_batch_max
        expired = await self.expire_due()
        unpersisted = await self.expire_unpersisted()
        inbox = await self.apply_payment_inbox()
        swept = await self.sweep_outbox()
        restocked = await self.sweep_restocks()
        backlog = max(expired, swept, restocked) >= full or bool(self._unpersisted_cursor)
        backlog = backlog or inbox >= self._b.settings.payment_inbox_batch_max
        return expired + unpersisted + swept, backlog

    async def expire_due(self) -> int:
        """Holds past expiry: one statement expires a batch in PostgreSQL (with
        their release rows), then one release call per sale returns the stock."""
        rows = await self._b.pg.fetch(
            _EXPIRE_DUE, self._b.settings.compensator_batch_max, self.name
        )
        await release_many_in_redis(self._b, [(r["order_id"], r["sale_id"]) for r in rows])
        if rows:
            self._m.releases.labels("expired").inc(len(rows))
        return len(rows)

    async def expire_unpersisted(self) -> int:
        """Holds past expiry still in a sale's stream (the consumer is down or
        behind): recorded expired in PostgreSQL, then released, a batch per
        sale at a time. Stream ids are times, so only entries older than the
        sale's hold are read, from a cursor past what earlier rounds handled
        (the entries stay in the stream until the consumer acks them)."""
        b = self._b
        now_ms = int(time.time() * 1000)
        sales_ = await live_sales.rows(b)
        if not sales_:
            return 0
        count = b.settings.compensator_batch_max
        async with b.redis.pipeline(transaction=False) as pipe:
            for r in sales_:
                cutoff = now_ms - r["hold_seconds"] * 1000
                start = self._unpersisted_cursor.get(r["sale_id"], "-")
                pipe.xrange(b.keys(r["sale_id"]).stream, start, str(max(cutoff, 0)), count=count)
            found: list[Any] = await pipe.execute()
        done: list[tuple[str, str]] = []
        for r, entries in zip(sales_, found, strict=True):
            due: list[Unpersisted] = []
            for _entry_id, fields in entries:
                o = _unpersisted(r["sale_id"], fields)
                if o is None or o.expires_ms > now_ms:
                    continue  # unreadable entries are the consumer's to dead-letter
                due.append(o)
            if len(entries) == count:  # more may be due: go on after the last one read
                self._unpersisted_cursor[r["sale_id"]] = "(" + as_text(entries[-1][0])
            else:
                self._unpersisted_cursor.pop(r["sale_id"], None)
            inserted = await release_many_unpersisted(
                b, due, "expired", self.name, "expired before persisted"
            )
            done += [(o.order_id, o.sale_id) for o in due if o.order_id in inserted]
        await release_many_in_redis(b, done)
        if done:
            self._m.releases.labels("expired").inc(len(done))
        return len(done)

    async def apply_payment_inbox(self) -> int:
        """Gateway events kept for orders that were not persisted yet: a bounded
        batch of those due, applied now that the order is in PostgreSQL (or
        refunded: it never will be), the rest backed off. See payment.py."""
        from flashsale.commerce import payment  # payment imports this module

        return await payment.apply_inbox(self._b)

    async def sweep_outbox(self) -> int:
        rows = await self._b.pg.fetch(
            "SELECT order_id, sale_id FROM releases WHERE redis_released_at IS NULL "
            "AND created_at <= now() - make_interval(secs => $1) ORDER BY created_at LIMIT $2",
            OUTBOX_GRACE_S, self._b.settings.compensator_batch_max,
        )
        await release_many_in_redis(self._b, [(r["order_id"], r["sale_id"]) for r in rows])
        return len(rows)

    async def sweep_restocks(self) -> int:
        rows = await self._b.pg.fetch(
            "SELECT restock_id, sale_id, quantity FROM restocks WHERE applied_at IS NULL "
            "AND created_at <= now() - make_interval(secs => $1) ORDER BY restock_id LIMIT $2",
            OUTBOX_GRACE_S, self._b.settings.compensator_batch_max,
        )
        for row in rows:
            await sales.apply_restock(
                self._b, row["sale_id"], row["restock_id"], row["quantity"]
            )
        return len(rows)


def _unpersisted(sale_id: str, fields: dict[bytes, bytes]) -> Unpersisted | None:
    try:
        return Unpersisted(
            order_id=fields[b"o"].decode(), sale_id=sale_id, user_id=fields[b"u"].decode(),
            quantity=int(fields[b"q"]), amount_cents=int(fields[b"a"]),
            created_ms=int(fields[b"c"]), expires_ms=int(fields[b"e"]),
            idempotency_key=fields[b"k"].decode() or None,
        )
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
