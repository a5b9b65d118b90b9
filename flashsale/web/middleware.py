"""One middleware turns every failure into the contract's error body.

Domain errors carry their status and code; aiohttp's own HTTP errors are
mapped; a backend that does not answer is 503 ``unavailable``; anything else
is logged and answered 500 without a traceback.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flashsale import errors
from flashsale.web.keys import ADMISSION, METRICS
from flashsale.web.replies import error_response

log = logging.getLogger("flashsale.web")

_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "invalid_request",
    415: "invalid_request",
}


def from_domain(exc: errors.FlashsaleError) -> web.Response:
    return error_response(exc.status, exc.code, exc.message, exc.retry_after_s)


def from_http(exc: web.HTTPException) -> web.Response:
    status = exc.status
    if status == 413:
        return error_response(400, "invalid_request", "the request body is larger than allowed",
                              None)
    code = _HTTP_CODES.get(status, "invalid_request" if status < 500 else "internal_error")
    resp = error_response(status, code, exc.reason or code, None)
    if status == 405 and "Allow" in exc.headers:
        resp.headers["Allow"] = exc.headers["Allow"]
    return resp


_UNAVAILABLE = (
    RedisConnectionError, RedisTimeoutError, asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError,
)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except errors.RateLimited as exc:
        await request.app[ADMISSION].hold(exc)  # a buyer over their limit waits (tarpit)
        resp = from_domain(exc)
    except errors.FlashsaleError as exc:
        resp = from_domain(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = from_http(exc)
    except _UNAVAILABLE as exc:
        log.warning("backend unavailable on %s %s: %r", request.method, request.path, exc)
        resp = from_domain(errors.Unavailable())
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        resp = error_response(500, "internal_error", "internal error", None)
    request.app[METRICS].count_response(resp.status)
    return resp
