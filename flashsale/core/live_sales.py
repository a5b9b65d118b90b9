"""The index of live sales: the one list of sales that any loop iterates.

A sale is **live** from its creation until it is **drained**. It is drained
when all of these hold (checked by :func:`drain`):

* it ended (``ends_at``) at least ``live_ended_grace_s`` ago (no front takes
  a reservation for it any more, whatever its clock skew; the dashboard shows
  a sale that just ended);
* Redis has no entry in its stream and no quantity ``pending`` (every
  accepted order was persisted or dead-lettered);
* PostgreSQL has no order whose hold is still open (``awaiting_payment``:
  it is paid or expires), no release still to apply in Redis (an open
  ``releases`` outbox row) and no restock still to apply (``restocks`` with
  no ``applied_at``).

Drained, it leaves the index (``sales.drained_at`` is set, in the statement
that checks the PostgreSQL conditions; migrations/0005_live_sales.sql). Work
that appears for it later, a release row (a paid order refunded late) or a
restock row, brings it back in the same statement (a trigger), so the loops
that finish that work see it again. Every loop (the consumer's streams, the
compensator's unpersisted expiry, the rebuild sweep, /metrics, the dashboard,
the waiting room's admitter) iterates :func:`ids` or :func:`rows`: a partial
index on the live rows keeps each round proportional to what is live, never
to the sales history.

A drained sale's Redis keys stay; if Redis loses them, nothing rebuilds them
eagerly (a reservation for it rebuilds it first, then answers 409
sale_not_active, and its body's ``available`` falls back to PostgreSQL's
``stock - sold``, exact once drained).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from flashsale.core.backends import Backends

# order statuses whose hold is still open (paid or expired later)
OPEN_HOLDS = ("awaiting_payment",)
DRAIN_BATCH_MAX = 500  # sales checked per drain round (drawn at random among the
# ended ones, so a batch of sales that stay undrained for long starves none)

_LIVE = "drained_at IS NULL"  # the predicate of the partial index sales_live

_DUE = f"""
SELECT sale_id FROM sales
WHERE {_LIVE} AND ends_at <= now() - make_interval(secs => $1)
ORDER BY random() LIMIT $2
"""

# the candidates (rows locked: a release or restock in flight holds the sale
# row, and is waited for by skipping it this round) ...
_LOCK = f"""
SELECT sale_id FROM sales WHERE sale_id = ANY($1::text[]) AND {_LIVE}
FOR UPDATE SKIP LOCKED
"""
# ... then, in a snapshot taken after the locks, the PostgreSQL conditions
_MARK = f"""
UPDATE sales s SET drained_at = now()
WHERE s.sale_id = ANY($1::text[]) AND s.{_LIVE}
  AND s.ends_at <= now() - make_interval(secs => $2)
  AND NOT EXISTS (SELECT 1 FROM orders o
                  WHERE o.sale_id = s.sale_id AND o.status = ANY($3::text[]))
  AND NOT EXISTS (SELECT 1 FROM releases r
                  WHERE r.sale_id = s.sale_id AND r.redis_released_at IS NULL)
  AND NOT EXISTS (SELECT 1 FROM restocks t
                  WHERE t.sale_id = s.sale_id AND t.applied_at IS NULL)
RETURNING s.sale_id
"""


# keyset paging on the index's order; no cursor ($2 NULL) is the first page
_PAGE = f"""
SELECT sale_id, created_at FROM sales
WHERE {_LIVE} AND ($2::timestamptz IS NULL OR created_at < $2
                   OR (created_at = $2 AND sale_id > $3))
ORDER BY created_at DESC, sale_id LIMIT $1
"""


async def ids(b: Backends) -> list[str]:
    """Every live sale's id, newest first."""
    return [
        r["sale_id"]
        for r in await b.pg.fetch(
            f"SELECT sale_id FROM sales WHERE {_LIVE} ORDER BY created_at DESC, sale_id"
        )
    ]


async def count(b: Backends) -> int:
    """How many sales are live."""
    return int(await b.pg.fetchval(f"SELECT count(*) FROM sales WHERE {_LIVE}"))


async def pages(b: Backends, size: int) -> AsyncIterator[list[str]]:
    """Every live sale's id, newest first, at most ``size`` at a time (keyset
    paging on the index's order, so each page is one bounded statement and a
    sale created meanwhile never shifts the pages)."""
    after: tuple[datetime | None, str] = (None, "")
    while True:
        got = await b.pg.fetch(_PAGE, size, *after)
        if got:
            yield [r["sale_id"] for r in got]
            after = (got[-1]["created_at"], got[-1]["sale_id"])
        if len(got) < size:
            return


async def rows(b: Backends, limit: int | None = None) -> list[asyncpg.Record]:
    """The live sales' rows, newest first (at most ``limit`` of them)."""
    return list(
        await b.pg.fetch(
            f"SELECT * FROM sales WHERE {_LIVE} ORDER BY created_at DESC, sale_id LIMIT $1",
            limit,
        )
    )


async def drain(b: Backends) -> list[str]:
    """One bounded round: mark drained the live sales that are (see above),
    at most DRAIN_BATCH_MAX checked. Returns the ids drained now."""
    grace_s = b.settings.live_ended_grace_s
    due = [r["sale_id"] for r in await b.pg.fetch(_DUE, grace_s, DRAIN_BATCH_MAX)]
    if not due:
        return []
    async with b.redis.pipeline(transaction=False) as pipe:
        for sale_id in due:
            k = b.keys(sale_id)
            pipe.xlen(k.stream)
            pipe.hget(k.sale, "pending")
        got = await pipe.execute()
    quiet = [
        sale_id for n, sale_id in enumerate(due)
        if int(got[2 * n]) == 0 and int(got[2 * n + 1] or 0) == 0
    ]
    if not quiet:
        return []
    async with b.pg.acquire() as conn, conn.transaction():
        locked = [r["sale_id"] for r in await conn.fetch(_LOCK, quiet)]
        if not locked:
            return []
        marked = await conn.fetch(_MARK, locked, grace_s, list(OPEN_HOLDS))
    return [r["sale_id"] for r in marked]
