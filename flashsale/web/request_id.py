"""Request ids and the access log.

Every request gets an id: the client's ``X-Request-Id`` when it is sane
(1-128 characters of ``[A-Za-z0-9._-]``), else a new one. It is put in the
logging context (with the sale and order id of the path, when there is one;
a reservation's handler adds the order it made) for everything logged while
the request runs, the access line included, and on every response, streams
included, as ``X-Request-Id`` (an ``on_response_prepare`` hook, so error
bodies and Server-Sent Events carry it too). One access log line per request
on the ``flashsale.access`` logger (INFO) unless FLASHSALE_ACCESS_LOG=0.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from flashsale.ops import logs
from flashsale.web.keys import SETTINGS

HEADER = "X-Request-Id"
SANE_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
# the request's own storage key (aiohttp >= 3.13 has typed request keys)
REQUEST_ID: Any = (
    web.RequestKey("flashsale_request_id", str) if hasattr(web, "RequestKey")
    else "flashsale_request_id"
)

access_log = logging.getLogger("flashsale.access")


def new_id() -> str:
    return secrets.token_hex(8)


def of_request(request: web.BaseRequest) -> str:
    """The id of this request (made on first use)."""
    rid = request.get(REQUEST_ID)
    if not isinstance(rid, str):
        raw = request.headers.get(HEADER)
        rid = raw if raw is not None and SANE_RE.fullmatch(raw) else new_id()
        request[REQUEST_ID] = rid
    return rid


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = of_request(request)
    tokens = [
        (logs.request_id, logs.request_id.set(rid)),
        (logs.sale_id, logs.sale_id.set(request.match_info.get("sale_id"))),
        (logs.order_id, logs.order_id.set(request.match_info.get("order_id"))),
    ]
    started = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:  # redirects and the like pass through the error middleware
        status = exc.status
        raise
    finally:
        if request.app[SETTINGS].access_log and access_log.isEnabledFor(logging.INFO):
            ms = (time.perf_counter() - started) * 1000
            access_log.info(
                "%s %s %d %.1fms", request.method, request.path, status, ms,
                extra={"fields": {"method": request.method, "path": request.path,
                                  "status": status, "duration_ms": round(ms, 2)}},
            )
        for var, token in reversed(tokens):
            var.reset(token)


async def stamp(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response carries the request's id."""
    response.headers[HEADER] = of_request(request)


def setup(app: web.Application) -> None:
    """Register the id stamp; the middleware is listed first in create_app (outermost)."""
    app.on_response_prepare.append(stamp)
