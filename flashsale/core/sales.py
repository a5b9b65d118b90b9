"""Sales: create, read, restock. PostgreSQL records them; Redis serves them.

Every stock change is one SQL statement and one Lua script: a sale row is
committed first, then loaded into Redis (load_sale); a restock row is
committed first, then applied to Redis once (restock, guarded by its id).
If the Redis step fails the committed row is applied later by the
compensator (restocks) or rebuilt by reconcile (a sale missing in Redis).
"""

from __future__ import annotations

import logging
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg
from redis.exceptions import RedisError

from flashsale import errors, validate
from flashsale.core.clients import Conn, as_text
from flashsale.core.scripts import Ended, Loaded, Restocked
from flashsale.core.statuses import SaleStatus
from flashsale.room.settings import RoomSettings, public_of_row
from flashsale.schemas import bounds

if TYPE_CHECKING:
    from flashsale.core.backends import Backends
    from flashsale.schemas.bodies import SaleCreate

log = logging.getLogger("flashsale.core.sales")

STOCK_MAX = bounds.MAX_STOCK  # names the benches use; the bounds module owns the values
LIMIT_MAX = bounds.MAX_PER_USER_LIMIT
HOLD_MAX_S = bounds.MAX_HOLD_SECONDS
_ALPHABET = string.ascii_lowercase + string.digits


def new_sale_id() -> str:
    return "sl_" + "".join(secrets.choice(_ALPHABET) for _ in range(12))


def to_ms(dt: datetime | None) -> int:
    return 0 if dt is None else int(dt.timestamp() * 1000)


class _HasEntryId(Protocol):
    @property
    def entry_id(self) -> str: ...


def stream_pos(entries: Iterable[_HasEntryId]) -> tuple[int, int]:
    """The highest stream entry id of ``entries`` as (ms, seq): what the sale's
    persisted watermark (sales.persisted_stream_ms/_seq) is raised to when
    they are persisted. Entry ids come from Redis, always "<ms>-<seq>"."""
    return max(parse_stream_id(e.entry_id) for e in entries)


def parse_stream_id(raw: str | bytes) -> tuple[int, int]:
    ms, _, seq = as_text(raw).partition("-")
    return int(ms), int(seq or 0)


def stream_id(pos: tuple[int, int]) -> str:
    return f"{pos[0]}-{pos[1]}"


def watermark(row: asyncpg.Record) -> tuple[int, int]:
    """The last stream entry id PostgreSQL persisted for the sale, as (ms, seq)."""
    return int(row["persisted_stream_ms"]), int(row["persisted_stream_seq"])


@dataclass(frozen=True, slots=True)
class NewSale:
    sku: str
    name: str
    price_cents: int
    stock: int
    per_user_limit: int
    starts_at: datetime
    ends_at: datetime | None
    hold_seconds: int
    waiting_room: RoomSettings | None = None

    @classmethod
    def of(cls, body: SaleCreate, now: datetime) -> NewSale:
        """The sale a decoded body asks for: its timestamps parsed (``starts_at``
        defaults to ``now``) and its window checked, what JSON Schema cannot say."""
        starts = validate.timestamp("starts_at", body.starts_at, now)
        assert starts is not None
        ends = validate.timestamp("ends_at", body.ends_at, None)
        if ends is not None and ends <= starts:
            raise errors.InvalidRequest("ends_at must be after starts_at")
        return cls(
            sku=body.sku, name=body.name, price_cents=body.price_cents, stock=body.stock,
            per_user_limit=body.per_user_limit, starts_at=starts, ends_at=ends,
            hold_seconds=body.hold_seconds,
            waiting_room=RoomSettings.of(body.waiting_room),
        )


def status_of(row: asyncpg.Record, available: int, now: datetime) -> SaleStatus:
    if now < row["starts_at"]:
        return "scheduled"
    if row["ends_at"] is not None and now >= row["ends_at"]:
        return "ended"
    return "sold_out" if available <= 0 else "active"


async def load_into_redis(b: Backends, row: asyncpg.Record) -> Loaded:
    k = b.keys(row["sale_id"])
    args: list[Any] = [
        row["stock"], row["per_user_limit"], row["price_cents"], to_ms(row["starts_at"]),
        to_ms(row["ends_at"]), row["hold_seconds"] * 1000, b.settings.consumer_group,
    ]
    room = RoomSettings.from_row(row["waiting_room"])
    if room is not None:  # written with the counters: never a moment without the room
        args += room.redis_args()
    loaded = await b.scripts.load_sale(keys=[k.sale, k.stream, k.restocks], args=args)
    return Loaded(int(loaded))


async def create(b: Backends, sale: NewSale) -> dict[str, Any]:
    sale_id = new_sale_id()
    row = await b.pg.fetchrow(
        """
        INSERT INTO sales (sale_id, sku, name, price_cents, stock, per_user_limit,
                           starts_at, ends_at, hold_seconds, waiting_room)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb)
        RETURNING *
        """,
        sale_id, sale.sku, sale.name, sale.price_cents, sale.stock, sale.per_user_limit,
        sale.starts_at, sale.ends_at, sale.hold_seconds,
        None if sale.waiting_room is None else sale.waiting_room.to_json(),
    )
    assert row is not None
    await load_into_redis(b, row)
    return await render(b, row)


async def fetch_row(b: Backends, sale_id: str, conn: Conn | None = None) -> asyncpg.Record:
    """The sale row (on ``conn`` when given, e.g. inside a snapshot transaction)."""
    validate.sale_id(sale_id)
    runner = conn if conn is not None else b.pg
    row = await runner.fetchrow("SELECT * FROM sales WHERE sale_id = $1", sale_id)
    if row is None:
        raise errors.SaleNotFound()
    return row


async def exists(b: Backends, sale_id: str) -> bool:
    """Whether PostgreSQL has the sale (the system of record; Redis may have lost it)."""
    return bool(await b.pg.fetchval("SELECT 1 FROM sales WHERE sale_id = $1", sale_id))


async def render(b: Backends, row: asyncpg.Record) -> dict[str, Any]:
    """The contract's sale body; `available` comes from Redis, the live counter
    (PostgreSQL's stock - sold when Redis does not have it or does not answer)."""
    try:
        raw = await b.redis.hget(b.keys(row["sale_id"]).sale, "available")
    except (RedisError, OSError):
        raw = None
    available = int(raw) if raw is not None else int(row["stock"] - row["sold"])
    return body(row, available, datetime.now(UTC))


def body(row: asyncpg.Record, available: int, now: datetime) -> dict[str, Any]:
    """The contract's sale body from its row and Redis's live ``available``."""
    return {
        "sale_id": row["sale_id"],
        "sku": row["sku"],
        "name": row["name"],
        "price_cents": row["price_cents"],
        "stock": row["stock"],
        "available": available,
        "per_user_limit": row["per_user_limit"],
        "starts_at": validate.iso(row["starts_at"]),
        "ends_at": validate.iso(row["ends_at"]),
        "hold_seconds": row["hold_seconds"],
        "status": status_of(row, available, now),
        "waiting_room": public_of_row(row.get("waiting_room")),
    }


async def get(b: Backends, sale_id: str) -> dict[str, Any]:
    return await render(b, await fetch_row(b, sale_id))


async def restock(b: Backends, sale_id: str, quantity: int) -> dict[str, Any]:
    validate.sale_id(sale_id)
    async with b.pg.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE sales SET stock = stock + $2 WHERE sale_id = $1 AND stock + $2 <= $3 "
            "RETURNING *",
            sale_id, quantity, STOCK_MAX,
        )
        if row is None:
            exists = await conn.fetchval("SELECT 1 FROM sales WHERE sale_id = $1", sale_id)
            if not exists:
                raise errors.SaleNotFound()
            raise errors.StockLimitExceeded(f"stock may not exceed {STOCK_MAX}")
        restock_id = await conn.fetchval(
            "INSERT INTO restocks (sale_id, quantity) VALUES ($1, $2) RETURNING restock_id",
            sale_id, quantity,
        )
    try:
        await apply_restock(b, sale_id, int(restock_id), quantity)
    except (RedisError, OSError) as exc:  # committed: the compensator's sweep applies it
        log.warning("restock %s of %s committed, Redis step deferred: %r", restock_id, sale_id, exc)
    return await render(b, row)


async def apply_restock(
    b: Backends, sale_id: str, restock_id: int, quantity: int
) -> Restocked:
    """Apply one committed restock to Redis (at most once) and mark it applied
    (not when the sale is missing in Redis: after its rebuild, which counts it)."""
    k = b.keys(sale_id)
    result = Restocked(
        int(await b.scripts.restock(keys=[k.sale, k.restocks], args=[restock_id, quantity]))
    )
    if result is not Restocked.SALE_MISSING:
        await b.pg.execute(
            "UPDATE restocks SET applied_at = now() WHERE restock_id = $1 AND applied_at IS NULL",
            restock_id,
        )
    return result


async def end(b: Backends, sale_id: str) -> dict[str, Any]:
    """End a sale now (contract v1.1, the kill switch for a pricing mistake).

    One guarded statement sets ``ends_at`` to now (and lowers ``starts_at``
    of a sale ended before it started, so ``ends_at > starts_at`` holds);
    then lua/end_sale-1.lua lowers ``ends_ms`` in the Redis sale hash, which
    every front's reserve script reads on each call: from its reply on,
    reservations answer 409 sale_not_active everywhere. The front's clock
    sets the instant, the clock the reserve script compares with. An ended
    sale is returned unchanged (the Redis step is repeated, harmlessly, so a
    retry after a failed Redis step completes it).
    """
    validate.sale_id(sale_id)
    now = datetime.now(UTC)
    row = await b.pg.fetchrow(
        "UPDATE sales SET ends_at = $2, "
        "starts_at = LEAST(starts_at, $2 - interval '1 millisecond') "
        "WHERE sale_id = $1 AND (ends_at IS NULL OR ends_at > $2) RETURNING *",
        sale_id, now,
    )
    if row is None:
        row = await fetch_row(b, sale_id)  # 404, or ended already: unchanged
    k = b.keys(sale_id)
    try:
        ended = Ended(int(await b.scripts.end_sale(
            keys=[k.sale], args=[to_ms(row["ends_at"]), to_ms(row["starts_at"])]
        )))
    except (RedisError, OSError) as exc:
        log.warning("sale %s ended in PostgreSQL, Redis step failed: %r", sale_id, exc)
        raise errors.Unavailable(
            "the sale is ended in PostgreSQL but not yet in Redis; retry to complete it"
        ) from exc
    if ended is Ended.SALE_MISSING:  # its rebuild reads ends_at from PostgreSQL
        log.info("sale %s ended while missing in Redis", sale_id)
    return await render(b, row)
