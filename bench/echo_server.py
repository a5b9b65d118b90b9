"""The echo ceiling: the same HTTP stack and request parsing as flashsale, no backend.

aiohttp on uvloop, no access log; per request it does what flashsale's
``create_order`` does before it reaches Redis — verify the buyer's JWT
(through flashsale's own Authenticator, with its cache of verified tokens),
validate the Idempotency-Key, read and parse the JSON body with orjson,
check its fields — and answers 202 with an order body of the same shape and
size. Run one process per worker; they share the port (SO_REUSEPORT).

    FLASHSALE_JWT_SECRET=... python -m bench.echo_server --port 8181
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import orjson
import uvloop
from aiohttp import web

from flashsale import errors, validate
from flashsale.auth import Authenticator
from flashsale.core.reserve import new_order_id
from flashsale.schemas import bounds
from flashsale.schemas.bodies import OrderCreate
from flashsale.schemas.decode import BodyReader
from flashsale.validate import iso_ms

BODY_MAX = bounds.MAX_BODY_BYTES
READ_ORDER = BodyReader(OrderCreate)  # as flashsale/web/routes.py reads it
PRICE_CENTS = 1999
HOLD_MS = 600_000

AUTH = web.AppKey("auth", Authenticator)


def _error(exc: errors.FlashsaleError) -> web.Response:
    body = orjson.dumps({"error": {"code": exc.code, "message": exc.message}})
    return web.Response(body=body, status=exc.status, content_type="application/json")


async def parse_order(request: web.Request) -> tuple[str, str | None, int, str]:
    """(buyer, Idempotency-Key, quantity, sale id) of POST .../orders, checked as
    flashsale checks them; raises the contract's FlashsaleError. The bench
    servers (echo and naive PostgreSQL) share it: the same request work."""
    user_id = request.app[AUTH].buyer(request.headers.get("Authorization"))
    key = request.headers.get("Idempotency-Key")
    if key is not None and not validate.IDEMPOTENCY_KEY_RE.match(key):
        raise errors.InvalidRequest("Idempotency-Key must be 1-128 printable ASCII characters")
    raw = await request.content.read(BODY_MAX + 1)
    if len(raw) > BODY_MAX:
        raise errors.InvalidRequest("the request body is too large")
    qty = READ_ORDER(raw).quantity
    return user_id, key, qty, validate.sale_id(request.match_info["sale_id"])


async def create_order(request: web.Request) -> web.Response:
    try:
        user_id, _key, qty, sale_id = await parse_order(request)
    except errors.FlashsaleError as exc:
        return _error(exc)
    now_ms = int(time.time() * 1000)
    order = {
        "order_id": new_order_id(sale_id, now_ms),
        "sale_id": sale_id,
        "user_id": user_id,
        "quantity": qty,
        "amount_cents": PRICE_CENTS * qty,
        "status": "pending",
        "expires_at": iso_ms(now_ms + HOLD_MS),
    }
    return web.Response(body=orjson.dumps(order), status=202, content_type="application/json")


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def create_app(jwt_secret: str, admin_token: str) -> web.Application:
    app = web.Application(client_max_size=BODY_MAX)
    app[AUTH] = Authenticator(jwt_secret, admin_token)
    app.router.add_post("/api/v1/sales/{sale_id}/orders", create_order)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(host: str, port: int, app: web.Application) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=True, backlog=4096)
    await site.start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    app = create_app(os.environ["FLASHSALE_JWT_SECRET"], os.environ["FLASHSALE_ADMIN_TOKEN"])
    uvloop.run(serve(args.host, args.port, app))


if __name__ == "__main__":
    main()
