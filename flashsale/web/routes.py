"""Sales and orders endpoints (see ../shared/api-contract.md)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import orjson
from aiohttp import web
from aiohttp.streams import StreamReader

from flashsale import errors, validate
from flashsale.commerce import orders
from flashsale.core import ledger, sales
from flashsale.core.outcomes import Refused
from flashsale.core.scripts import RESERVE_ERRORS
from flashsale.ops import logs
from flashsale.room import passes
from flashsale.schemas.bodies import OrderCreate, Restock, SaleCreate
from flashsale.schemas.decode import BodyReader
from flashsale.web import front
from flashsale.web.keys import ADMISSION, AUTH, BACKENDS, METRICS, REBUILDS, RESERVER, SETTINGS
from flashsale.web.replies import json_response

READ_SALE = BodyReader(SaleCreate)
READ_RESTOCK = BodyReader(Restock)
READ_ORDER = BodyReader(OrderCreate)


async def read_body(request: web.Request) -> bytes:
    """The whole body (every handler reads through here), however it is split
    on the wire: at most ``body_max_bytes``, a Content-Length past it refused
    before a byte is read, a chunked body stopped at the bound; all of it
    within ``http_body_timeout_s`` (else 408 and the connection closes)."""
    settings = request.app[SETTINGS]
    limit = settings.body_max_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        if request.content.is_eof():  # all of it has arrived (the common case): no timer,
            body = request.content.read_nowait()  # no await: it is in the buffer
            if len(body) > limit:
                raise _too_large(limit)
            return body
        async with asyncio.timeout(settings.http_body_timeout_s):
            return await _read_bounded(request.content, limit)
    except TimeoutError:
        front.close_after_response(request)
        raise errors.RequestTimeout(
            f"the request body was not received within {settings.http_body_timeout_s:g} s"
        ) from None
    except (web.RequestPayloadError, ConnectionError, EOFError):
        raise errors.InvalidRequest("the request body is malformed or ended early") from None


async def _read_bounded(content: StreamReader, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while chunk := await content.read(limit + 1 - size):
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
    return b"".join(parts)


def _too_large(limit: int) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"the request body is larger than {limit} bytes")


def buyer(request: web.Request) -> str:
    """The authenticated buyer, admitted by the rate limits (429 otherwise)."""
    user_id = request.app[AUTH].buyer(request.headers.get("Authorization"))
    request.app[ADMISSION].admit(user_id)
    return user_id


def admin(request: web.Request) -> None:
    request.app[AUTH].admin(request.headers.get("Authorization"))


async def create_sale(request: web.Request) -> web.Response:
    admin(request)
    new = sales.NewSale.of(READ_SALE(await read_body(request)), datetime.now(UTC))
    return json_response(await sales.create(request.app[BACKENDS], new), 201)


async def get_sale(request: web.Request) -> web.Response:
    return json_response(await sales.get(request.app[BACKENDS], request.match_info["sale_id"]))


async def restock_sale(request: web.Request) -> web.Response:
    admin(request)
    qty = READ_RESTOCK(await read_body(request)).quantity
    b = request.app[BACKENDS]
    return json_response(await sales.restock(b, request.match_info["sale_id"], qty))


async def get_ledger(request: web.Request) -> web.Response:
    admin(request)
    return json_response(await ledger.ledger(request.app[BACKENDS], request.match_info["sale_id"]))


def idempotency_key(request: web.Request) -> str | None:
    raw = request.headers.get("Idempotency-Key")
    if raw is None:
        return None
    if not validate.IDEMPOTENCY_KEY_RE.fullmatch(raw):
        raise errors.InvalidRequest("Idempotency-Key must be 1-128 printable ASCII characters")
    return raw


async def create_order(request: web.Request) -> web.Response:
    app = request.app
    metrics = app[METRICS]
    started = time.perf_counter()
    outcome = "error"
    sale_id: str | None = None  # tallied per sale once it is one (the dashboard's charts)
    try:
        user_id = buyer(request)
        key = idempotency_key(request)
        qty = READ_ORDER(await read_body(request)).quantity
        sale_id = validate.sale_id(request.match_info["sale_id"])
        ticket, why_no_pass = room_pass(request, sale_id, user_id)
        result = await app[RESERVER].reserve(sale_id, user_id, qty, key, ticket)
        if isinstance(result, Refused):
            if result.error is errors.SaleNotFound:
                await _missing_in_redis(request, sale_id)
            if result.error is errors.PassRequired and why_no_pass is not None:
                raise why_no_pass  # the room wants a pass: say what was wrong with this one
            outcome = result.error.code
            return refusal_response(result.error)
        outcome = "replay" if result.replay else "accepted"
        logs.order_id.set(result.order_id)  # the access line names the order made (the
        # request middleware resets it)
        return json_response(result.body(), 202)
    except errors.FlashsaleError as exc:
        outcome = exc.code
        raise
    finally:
        elapsed_s = time.perf_counter() - started
        metrics.count_reservation(outcome)
        metrics.reserve_latency.observe(elapsed_s)
        if sale_id is not None and outcome != errors.SaleNotFound.code:
            metrics.per_sale.note(sale_id, outcome, elapsed_s)


def room_pass(
    request: web.Request, sale_id: str, user_id: str
) -> tuple[str, errors.PassRequired | None]:
    """The ticket the waiting-room pass names (header PASS_HEADER), verified
    here without Redis, and why the pass sent is not one. An absent or invalid
    pass is no pass ("" for the reservation script, which alone knows whether
    the sale has a room and then answers PASS_REQUIRED): a sale without a room
    ignores the header, whatever it holds, as it did before rooms existed."""
    token = request.headers.get(passes.PASS_HEADER)
    if token is None:
        return "", None
    try:
        now_ms = int(time.time() * 1000)
        return passes.verify(request.app[SETTINGS].pass_secret, token, sale_id, user_id,
                             now_ms), None
    except errors.PassRequired as why:
        return "", why


_REFUSAL_BODIES = {
    cls: orjson.dumps({"error": {"code": cls.code, "message": cls().message}})
    for cls in RESERVE_ERRORS.values()
}


def refusal_response(error: type[errors.FlashsaleError]) -> web.Response:
    """A decided refusal from a pre-encoded body: the common answer in a spike."""
    return web.Response(
        body=_REFUSAL_BODIES[error], status=error.status, content_type="application/json"
    )


async def _missing_in_redis(request: web.Request, sale_id: str) -> None:
    """A sale PostgreSQL has but Redis lost: rebuild it and answer 503, not 404."""
    if await sales.exists(request.app[BACKENDS], sale_id):
        request.app[REBUILDS].trigger(sale_id)
        raise errors.Unavailable("the sale is being restored; retry shortly")


async def get_order(request: web.Request) -> web.Response:
    user_id = buyer(request)
    b = request.app[BACKENDS]
    return json_response(await orders.get(b, request.match_info["order_id"], user_id))


async def cancel_order(request: web.Request) -> web.Response:
    user_id = buyer(request)
    b = request.app[BACKENDS]
    return json_response(await orders.cancel(b, request.match_info["order_id"], user_id))


def add_routes(app: web.Application) -> None:
    body = front.expect_continue  # a Content-Length past the bound: no "100 Continue"
    # the hot route first: aiohttp tries routes in the order they were added
    app.router.add_post("/api/v1/sales/{sale_id}/orders", create_order, expect_handler=body)
    app.router.add_post("/api/v1/sales", create_sale, expect_handler=body)
    app.router.add_get("/api/v1/sales/{sale_id}", get_sale, allow_head=False)
    app.router.add_post("/api/v1/sales/{sale_id}/restock", restock_sale, expect_handler=body)
    app.router.add_get("/api/v1/admin/sales/{sale_id}/ledger", get_ledger, allow_head=False)
    app.router.add_get("/api/v1/orders/{order_id}", get_order, allow_head=False)
    app.router.add_post("/api/v1/orders/{order_id}/cancel", cancel_order, expect_handler=body)
