"""The naive PostgreSQL baseline: what a team would write without Redis.

The same HTTP stack and request parsing as the echo server (aiohttp on uvloop,
flashsale's Authenticator with its token cache, orjson), then, in ONE
transaction on an asyncpg pool:

    UPDATE naive.sales SET available = available - q
     WHERE sale_id = $1 AND available >= q RETURNING price_cents, hold_seconds;
    INSERT INTO naive.orders (...) VALUES (...);

The per-user limit is a unique constraint on (sale_id, user_id); a repeated
Idempotency-Key is a unique constraint on (user_id, idempotency_key) and
answers the first order again. Its tables live in their own schema.

    FLASHSALE_JWT_SECRET=... python -m bench.naive_pg_server --port 8182 --dsn postgresql://...
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import uvloop
from aiohttp import web

from bench.echo_server import AUTH, BODY_MAX, _error, parse_order, serve
from flashsale import errors
from flashsale.auth import Authenticator
from flashsale.core.reserve import new_order_id
from flashsale.validate import iso

SCHEMA = "naive"
SCHEMA_SQL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.sales (
    sale_id      text   PRIMARY KEY,
    price_cents  bigint NOT NULL CHECK (price_cents >= 0),
    stock        bigint NOT NULL CHECK (stock >= 0),
    available    bigint NOT NULL CHECK (available >= 0),
    hold_seconds integer NOT NULL
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.orders (
    order_id        text        PRIMARY KEY,
    sale_id         text        NOT NULL REFERENCES {SCHEMA}.sales (sale_id),
    user_id         text        NOT NULL,
    quantity        integer     NOT NULL CHECK (quantity >= 1),
    amount_cents    bigint      NOT NULL,
    status          text        NOT NULL,
    idempotency_key text        NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    UNIQUE (sale_id, user_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS orders_idem_uq ON {SCHEMA}.orders (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
"""

_RESERVE = f"""
UPDATE {SCHEMA}.sales SET available = available - $2
 WHERE sale_id = $1 AND available >= $2
RETURNING price_cents, hold_seconds
"""
_INSERT = f"""
INSERT INTO {SCHEMA}.orders (order_id, sale_id, user_id, quantity, amount_cents, status,
                             idempotency_key, expires_at)
VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7)
"""
_BY_KEY = f"""
SELECT order_id, sale_id, user_id, quantity, amount_cents, expires_at
  FROM {SCHEMA}.orders WHERE user_id = $1 AND idempotency_key = $2
"""

POOL = web.AppKey("pool", asyncpg.Pool)


def _order(row: Any) -> dict[str, Any]:
    return {
        "order_id": row["order_id"], "sale_id": row["sale_id"], "user_id": row["user_id"],
        "quantity": row["quantity"], "amount_cents": row["amount_cents"], "status": "pending",
        "expires_at": iso(row["expires_at"]),
    }


def _json(body: object, status: int) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def _reserve(
    pool: asyncpg.Pool, sale_id: str, user_id: str, qty: int, key: str | None
) -> web.Response:
    now_ms = int(time.time() * 1000)
    order_id = new_order_id(sale_id, now_ms)
    async with pool.acquire() as conn:
        try:
            async with conn.transaction():
                row = await conn.fetchrow(_RESERVE, sale_id, qty)
                if row is None:
                    exists = await conn.fetchval(
                        f"SELECT 1 FROM {SCHEMA}.sales WHERE sale_id = $1", sale_id
                    )
                    return _error(errors.SoldOut() if exists else errors.SaleNotFound())
                amount = row["price_cents"] * qty
                expires = datetime.fromtimestamp(now_ms / 1000, UTC) + timedelta(
                    seconds=row["hold_seconds"]
                )
                await conn.execute(_INSERT, order_id, sale_id, user_id, qty, amount, key, expires)
        except asyncpg.UniqueViolationError:
            # the transaction rolled back: a replayed key, or the buyer's limit
            if key is not None:
                first = await conn.fetchrow(_BY_KEY, user_id, key)
                if first is not None:
                    if first["sale_id"] != sale_id or first["quantity"] != qty:
                        return _error(errors.IdempotencyKeyReused())
                    return _json(_order(first), 202)
            return _error(errors.LimitExceeded())
    body = {
        "order_id": order_id, "sale_id": sale_id, "user_id": user_id, "quantity": qty,
        "amount_cents": amount, "status": "pending", "expires_at": iso(expires),
    }
    return _json(body, 202)


async def create_order(request: web.Request) -> web.Response:
    try:
        user_id, key, qty, sale_id = await parse_order(request)
    except errors.FlashsaleError as exc:
        return _error(exc)
    try:
        return await _reserve(request.app[POOL], sale_id, user_id, qty, key)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return _error(errors.Unavailable())


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def setup_schema(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA_SQL)
    finally:
        await conn.close()


async def create_sale(dsn: str, sale_id: str, stock: int, price_cents: int = 1999) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f"INSERT INTO {SCHEMA}.sales (sale_id, price_cents, stock, available, hold_seconds) "
            "VALUES ($1, $2, $3, $3, 600)",
            sale_id, price_cents, stock,
        )
    finally:
        await conn.close()


async def sale_figures(dsn: str, sale_id: str) -> dict[str, int]:
    """stock, available and the orders' quantity: the naive system's own ledger."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            f"SELECT s.stock, s.available, "
            f"(SELECT coalesce(sum(quantity), 0) FROM {SCHEMA}.orders o "
            f" WHERE o.sale_id = s.sale_id)::bigint AS ordered "
            f"FROM {SCHEMA}.sales s WHERE s.sale_id = $1",
            sale_id,
        )
    finally:
        await conn.close()
    assert row is not None
    return {"stock": row["stock"], "available": row["available"], "ordered": row["ordered"]}


def create_app(jwt_secret: str, admin_token: str, dsn: str, pool_size: int) -> web.Application:
    app = web.Application(client_max_size=BODY_MAX)
    app[AUTH] = Authenticator(jwt_secret, admin_token)

    async def pool_ctx(app: web.Application) -> Any:
        pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size)
        assert pool is not None
        app[POOL] = pool
        yield
        await pool.close()

    app.cleanup_ctx.append(pool_ctx)
    app.router.add_post("/api/v1/sales/{sale_id}/orders", create_order)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dsn", required=True)
    p.add_argument("--pool", type=int, default=16, help="asyncpg pool size (default 16)")
    args = p.parse_args()
    app = create_app(
        os.environ["FLASHSALE_JWT_SECRET"], os.environ["FLASHSALE_ADMIN_TOKEN"], args.dsn, args.pool
    )
    uvloop.run(serve(args.host, args.port, app))


if __name__ == "__main__":
    main()
