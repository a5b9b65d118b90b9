"""The consumer's one PostgreSQL transaction per batch, and what PostgreSQL's
failures mean for an entry.

``persist_batch`` inserts the orders (``ON CONFLICT DO NOTHING``: the order id is
made before the write, so a redelivery is harmless), then the final deduction
per sale in sorted order (``sold + n <= stock``, with the persisted stream
watermark raised); a deduction PostgreSQL refuses turns those orders ``failed``
with their release rows (core/release.py). ``refused`` / ``transient`` tell a
refusal of the row itself (counts against the entry) from the database being
busy or unreachable (retried with backoff, never counted).
"""

from __future__ import annotations

from collections import defaultdict

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flashsale.core import record, release
from flashsale.core.clients import Conn
from flashsale.core.record import Order
from flashsale.core.sales import stream_pos

_DEDUCT = """
UPDATE sales SET sold = sold + $2,
    persisted_stream_ms = GREATEST(persisted_stream_ms, $3),
    persisted_stream_seq = CASE WHEN $3 > persisted_stream_ms THEN $4
        WHEN $3 = persisted_stream_ms THEN GREATEST(persisted_stream_seq, $4)
        ELSE persisted_stream_seq END
WHERE sale_id = $1 AND sold + $2 <= stock RETURNING sold
"""  # with the stream watermark (sales.stream_pos): never lowered


async def persist_batch(conn: Conn, entries: list[Order], actor: str) -> list[Order]:
    """Persist entries in ONE transaction. Returns the orders that failed their
    final deduction (recorded as failed with a release row, to compensate)."""
    failed: list[Order] = []
    by_id = {e.order_id: e for e in entries}
    async with conn.transaction():
        inserted = await record.insert(conn, entries, "awaiting_payment")
        per_sale: dict[str, list[Order]] = defaultdict(list)
        for row in inserted:
            per_sale[row["sale_id"]].append(by_id[row["order_id"]])
        for sale_id in sorted(per_sale):  # fixed lock order
            batch = per_sale[sale_id]
            total = sum(e.quantity for e in batch)
            if await conn.fetchval(_DEDUCT, sale_id, total, *stream_pos(batch)) is not None:
                continue
            for e in batch:  # slow path: deduct order by order, fail what does not fit
                if await conn.fetchval(_DEDUCT, sale_id, e.quantity, *stream_pos([e])) is None:
                    await release.transition(
                        conn, e.order_id, "failed", actor, sold_counted=False,
                        detail="final deduction refused: sold would pass stock",
                    )
                    failed.append(e)
        failed += await _fail_duplicates(conn, entries, {r["order_id"] for r in inserted}, actor)
    return failed


async def _fail_duplicates(
    conn: Conn, entries: list[Order], inserted: set[str], actor: str
) -> list[Order]:
    """Entries neither inserted now nor present already collided on the unique
    (sale, buyer, idempotency key): Redis lost the key's record. Fail them."""
    missing = [e for e in entries if e.order_id not in inserted]
    if not missing:
        return []
    present = {
        r["order_id"]
        for r in await conn.fetch(
            "SELECT order_id FROM orders WHERE order_id = ANY($1::text[])",
            [e.order_id for e in missing],
        )
    }
    failed = [e for e in missing if e.order_id not in present]
    await release.record_unpersisted(conn, failed, "failed", actor, "duplicate idempotency key")
    return failed


def refused(exc: asyncpg.PostgresError) -> bool:
    """PostgreSQL refused the row itself: a data error (class 22, including
    asyncpg's own refusal to encode a value) or a constraint on the row (class
    23: CHECK, NOT NULL, foreign key). Only this counts against an entry."""
    return isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError)


def transient(exc: BaseException) -> bool:
    """PostgreSQL (or Redis, or the network) failed, not the entry: every
    server error that is not a refusal of the row (too many connections,
    statement or lock timeout, admin shutdown, cannot connect now, deadlock,
    serialization failure, connection exceptions, ...) and every lost or
    timed-out connection. Retried with backoff, never counted."""
    if isinstance(exc, asyncpg.PostgresError):
        return not refused(exc)
    return isinstance(
        exc,
        asyncpg.InterfaceError | asyncpg.InternalClientError | OSError | TimeoutError
        | RedisConnectionError | RedisTimeoutError,
    )


