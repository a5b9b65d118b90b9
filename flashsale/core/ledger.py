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
from typing import TYPE_CHECKING, Any

import asyncpg
from redis.exceptions import RedisError, ResponseError

from flashsale.core import live_sales, sales
from flashsale.core.clients import as_text
from flashsale.core.scripts import Rebuilt
from flashsale.core.statuses import HOLDING, PERSISTED, RELEASED
from flashsale.room.settings import RoomSettings

if TYPE_CHECKING:
    from flashsale.core.backends import Backends

log = logging.getLogger("flashsale.core.ledger")



async def ledger(b: Backends, sale_id: str) -> dict[str, Any]:
    row = await sales.fetch_row(b, sale_id)
    sums: dict[str, int] = dict.fromkeys(PERSISTED, 0)
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
    consistent = is_consistent(figures, int(row["sold"]), in_redis)
    return {**figures, "consistent": consistent, "sold": int(row["sold"]), "in_redis": in_redis}


def is_consistent(figures: dict[str, int], sold: int, in_redis: bool) -> bool:
    """The ledger's equation over one sale's figures (stock, available, pending, PERSISTED)."""
    holding = sum(figures[s] for s in HOLDING)
    return (
        in_redis
        and figures["stock"] == figures["available"] + figures["pending"] + holding
        and all(v >= 0 for v in figures.values())
        and sold == holding
    )


async def rebuild(b: Backends, sale_id: str, *, force: bool = False) -> bool:
    """Rebuild the sale's Redis counters from PostgreSQL (see lua/rebuild_sale-6.lua)
    when Redis lost them: the sale hash is missing, or Redis lost writes that
    PostgreSQL has (its stream is behind the watermark, the last entry
    PostgreSQL persisted: a restart that lost its last second).

    Without ``force`` a sale in neither case is left alone (the script decides
    it again, atomically). With ``force`` the sale hash is removed first
    (reservations answer 503 for the moment it takes) and rebuilt. Returns
    True when it rebuilt.
    """
    k = b.keys(sale_id)
    if force:
        await sales.fetch_row(b, sale_id)  # an unknown sale changes nothing
        await b.redis.delete(k.sale)
    elif not await _stale(b, sale_id):
        return False
    redis_holds = [as_text(h) for h in await b.redis.hkeys(k.holds)]
    snap = await _snapshot(b, sale_id, redis_holds)
    row = snap.sale
    args: list[Any] = [
        row["stock"], row["per_user_limit"], row["price_cents"], sales.to_ms(row["starts_at"]),
        sales.to_ms(row["ends_at"]), row["hold_seconds"] * 1000, b.settings.consumer_group,
        sales.stream_id(sales.watermark(row)), len(snap.holding),
    ]
    for h in snap.holding:
        args += [h["order_id"], h["quantity"], h["user_id"]]
    args.append(len(snap.released))
    args += snap.released
    args += snap.restocks
    done = Rebuilt(int(
        await b.scripts.rebuild_sale(
            keys=[k.sale, k.users, k.holds, k.pending, k.stream, k.restocks], args=args
        )
    ))
    room = RoomSettings.from_row(row["waiting_room"])
    if done is not Rebuilt.UNCHANGED and room is not None:  # the rebuilt hash gets its room back
        await b.scripts.room_configure(keys=[k.sale], args=room.redis_args())
    if done is Rebuilt.LOST_WRITES:
        log.warning("Redis lost writes of sale %s that PostgreSQL has (its stream is behind "
                    "the persisted entry %d-%d): rebuilt from PostgreSQL",
                    sale_id, *sales.watermark(row))
    elif done:
        log.warning("rebuilt Redis state of sale %s from PostgreSQL", sale_id)
    return done is not Rebuilt.UNCHANGED


STATE_CHUNK = 500  # sales checked per Redis pipeline


async def _stale(b: Backends, sale_id: str) -> bool:
    """The sale hash is missing, or the stream is behind the watermark."""
    row = await sales.fetch_row(b, sale_id)
    missing, behind = await _redis_state(b, [(sale_id, sales.watermark(row))])
    return bool(missing or behind)


async def _redis_state(
    b: Backends, marks: list[tuple[str, tuple[int, int]]]
) -> tuple[list[str], list[str]]:
    """Of (sale_id, watermark) pairs: the sales missing in Redis, and the sales
    present whose stream was last generated below their watermark (Redis lost
    writes that PostgreSQL has). One pipeline per chunk of sales."""
    missing: list[str] = []
    behind: list[str] = []
    for i in range(0, len(marks), STATE_CHUNK):
        chunk = marks[i:i + STATE_CHUNK]
        async with b.redis.pipeline(transaction=False) as pipe:
            for sale_id, _mark in chunk:
                k = b.keys(sale_id)
                pipe.exists(k.sale)
                pipe.xinfo_stream(k.stream)
            replies = await pipe.execute(raise_on_error=False)
        for j, (sale_id, mark) in enumerate(chunk):
            exists, info = replies[2 * j], replies[2 * j + 1]
            if isinstance(exists, Exception):
                raise exists
            if not exists:
                missing.append(sale_id)
                continue
            if isinstance(info, ResponseError) and "no such key" in str(info).lower():
                last = (0, 0)  # the stream is gone: every persisted entry is behind it
            elif isinstance(info, Exception):
                raise info
            else:
                last = sales.parse_stream_id(info["last-generated-id"])
            if last < mark:
                behind.append(sale_id)
    return missing, behind


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
    """Rebuild every live sale whose Redis state is gone or lost writes that
    PostgreSQL has (at start and on a schedule; flashsale/core/live_sales.py)."""
    rows = await live_sales.rows(b)
    missing, behind = await _redis_state(b, [(r["sale_id"], sales.watermark(r)) for r in rows])
    return [sid for sid in sorted(missing + behind) if await rebuild(b, sid)]


async def rebuild_lost_writes(b: Backends) -> list[str]:
    """Rebuild every sale present in Redis whose stream is behind its watermark.
    Sales missing in Redis are left to the rebuild their first reservation
    triggers (they take none meanwhile). Cost: one PostgreSQL query and one
    Redis pipeline per 500 sales that ever persisted an order."""
    try:
        rows = await b.pg.fetch(
            "SELECT sale_id, persisted_stream_ms, persisted_stream_seq FROM sales "
            "WHERE (persisted_stream_ms, persisted_stream_seq) > (0, 0) ORDER BY sale_id"
        )
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
        log.warning("PostgreSQL keeps no stream watermarks yet (migrations missing): "
                    "Redis is not checked for lost writes")
        return []
    _missing, behind = await _redis_state(
        b, [(r["sale_id"], sales.watermark(r)) for r in rows]
    )
    rebuilt = []
    for sid in behind:
        try:
            if await rebuild(b, sid):
                rebuilt.append(sid)
        except ResponseError as exc:  # the script refused (any other failure: not verified)
            # frozen instead: a missing sale takes no reservation, and its first
            # reservation (or the periodic sweep) tries the rebuild again
            log.error("rebuild of %s (Redis lost writes) refused (%s); the sale is frozen",
                      sid, exc)
            await b.redis.delete(b.keys(sid).sale)
    return rebuilt


VERIFY_ROUNDS_MAX = 5


async def verify_server(b: Backends) -> str:
    """Check the Redis server behind ``b`` against PostgreSQL: rebuild every sale
    whose Redis lost writes PostgreSQL has. Returns the server's run_id, the
    same before and after the check (a restart during it starts it over)."""
    for _ in range(VERIFY_ROUNDS_MAX):
        before = await _run_id(b)
        rebuilt = await rebuild_lost_writes(b)
        after = await _run_id(b)
        if after == before:
            if rebuilt:
                log.warning("Redis %s lost writes of %d sale(s); rebuilt: %s",
                            after, len(rebuilt), ", ".join(rebuilt))
            return after
    raise RedisError(f"Redis restarted {VERIFY_ROUNDS_MAX} times while it was verified")


async def _run_id(b: Backends) -> str:
    info: Any = await b.redis.info("server")
    return str(info.get("run_id", ""))


async def reconcile(b: Backends, sale_id: str, *, repair: bool) -> dict[str, Any]:
    """The ledger; with ``repair``, Redis rebuilt from PostgreSQL first."""
    if repair:
        await rebuild(b, sale_id, force=True)
    return await ledger(b, sale_id)
