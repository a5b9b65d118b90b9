"""The ledger of a sale, and reconciliation of Redis from PostgreSQL.

    stock == available + pending + awaiting_payment + paid + shipped

`stock` is PostgreSQL's; `available` and `pending` (accepted, not yet
persisted) are Redis's; the rest are PostgreSQL's sums by status. While the
queue drains an order can count both as pending and as persisted, so the
ledger is consistent once the queue is drained (contract, guarantee 2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import asyncpg

from flashsale import sales
from flashsale.backends import Backends, as_text

log = logging.getLogger("flashsale.ledger")

STATUSES = ("awaiting_payment", "paid", "shipped", "cancelled", "expired", "failed")
HOLDING = ("awaiting_payment", "paid", "shipped")
RELEASED = ("cancelled", "expired", "failed")


async def ledger(b: Backends, sale_id: str) -> dict[str, Any]:
    row = await sales.fetch_row(b, sale_id)
    sums = {s: 0 for s in STATUSES}
    for r in await b.pg.fetch(
        "SELECT status, sum(quantity)::bigint AS q FROM orders WHERE sale_id = $1 "
        "GROUP BY status",
        sale_id,
    ):
        sums[r["status"]] = int(r["q"])
    raw_available, raw_pending = await b.redis.hmget(b.keys(sale_id).sale, "available", "pending")
    in_redis = raw_available is not None
    available = int(raw_available) if raw_available is not None else 0
    pending = int(raw_pending) if raw_pending is not None else 0
    stock = int(row["stock"])
    figures = {"stock": stock, "available": available, "pending": pending, **sums}
    consistent = (
        in_redis
        and stock == available + pending + sums["awaiting_payment"] + sums["paid"] + sums["shipped"]
        and all(v >= 0 for v in figures.values())
        and int(row["sold"]) == sums["awaiting_payment"] + sums["paid"] + sums["shipped"]
    )
    return {**figures, "consistent": consistent, "sold": int(row["sold"]), "in_redis": in_redis}


async def rebuild(b: Backends, sale_id: str, *, force: bool = False) -> bool:
    """Rebuild the sale's Redis counters from PostgreSQL (see lua/rebuild_sale-6.lua).

    Without ``force`` only a sale missing in Redis is rebuilt. With ``force``
    the sale hash is removed first (reservations answer 503 for the moment it
    takes) and rebuilt. Returns True when it rebuilt.
    """
    k = b.keys(sale_id)
    if force:
        await sales.fetch_row(b, sale_id)  # an unknown sale changes nothing
        await b.redis.delete(k.sale)
    elif await b.redis.exists(k.sale):
        return False
    redis_holds = [as_text(h) for h in await b.redis.hkeys(k.holds)]
    snap = await _snapshot(b, sale_id, redis_holds)
    row = snap.sale
    args: list[Any] = [
        row["stock"], row["per_user_limit"], row["price_cents"], sales.to_ms(row["starts_at"]),
        sales.to_ms(row["ends_at"]), row["hold_seconds"] * 1000, b.settings.consumer_group,
        len(snap.holding),
    ]
    for h in snap.holding:
        args += [h["order_id"], h["quantity"], h["user_id"]]
    args.append(len(snap.released))
    args += snap.released
    args += snap.restocks
    done = int(
        await b.scripts.rebuild_sale(
            keys=[k.sale, k.users, k.holds, k.pending, k.stream, k.restocks], args=args
        )
    )
    if done:
        log.warning("rebuilt Redis state of sale %s from PostgreSQL", sale_id)
    return bool(done)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a rebuild reads from PostgreSQL, all as of one moment."""

    sale: asyncpg.Record
    holding: list[asyncpg.Record]  # order_id, quantity, user_id of orders holding stock
    released: list[str]  # of the orders Redis holds, those PostgreSQL has released
    restocks: list[int]  # restock ids counted in the sale's stock


async def _snapshot(b: Backends, sale_id: str, redis_holds: list[str]) -> Snapshot:
    """One REPEATABLE READ read-only transaction: the stock, the holds and the
    restock ids agree (read apart, a restock committed in between was counted
    as applied without being in the stock, and lost for good)."""
    async with b.pg.acquire() as conn, conn.transaction(
        isolation="repeatable_read", readonly=True
    ):
        row = await sales.fetch_row(b, sale_id, conn)
        holding = await conn.fetch(
            "SELECT order_id, quantity, user_id FROM orders WHERE sale_id = $1 "
            "AND status = ANY($2::text[]) ORDER BY order_id",
            sale_id, list(HOLDING),
        )
        released = await conn.fetch(
            "SELECT order_id FROM orders WHERE order_id = ANY($1::text[]) "
            "AND status = ANY($2::text[])",
            redis_holds, list(RELEASED),
        )
        restocks = await conn.fetch(
            "SELECT restock_id FROM restocks WHERE sale_id = $1", sale_id
        )
    return Snapshot(
        row, list(holding), [r["order_id"] for r in released],
        [int(r["restock_id"]) for r in restocks],
    )


async def rebuild_missing(b: Backends) -> list[str]:
    """Rebuild every sale whose Redis state is gone (at start and on a schedule)."""
    rows = await b.pg.fetch("SELECT sale_id FROM sales ORDER BY sale_id")
    if not rows:
        return []
    async with b.redis.pipeline(transaction=False) as pipe:
        for r in rows:
            pipe.exists(b.keys(r["sale_id"]).sale)
        exists = await pipe.execute()
    rebuilt = []
    for r, e in zip(rows, exists, strict=True):
        if not e and await rebuild(b, r["sale_id"]):
            rebuilt.append(r["sale_id"])
    return rebuilt


async def reconcile(b: Backends, sale_id: str, *, repair: bool) -> dict[str, Any]:
    """The ledger; with ``repair``, Redis rebuilt from PostgreSQL first."""
    if repair:
        await rebuild(b, sale_id, force=True)
    return await ledger(b, sale_id)
