"""The operator's view: the dashboard page, the end-sale switch, the live stream.

``setup(app)`` is the one place these are registered (the app factory calls
it): ``GET /admin`` (the page, flashsale/web/static/admin.html + admin.js,
plain HTML and JS), ``POST /api/v1/sales/{sale_id}/end`` (contract v1.1),
``GET /api/v1/admin/events`` (flashsale/web/events_stream.py), and the
per-second stats flush of this front (flashsale/ops/stats.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from flashsale.core import sales
from flashsale.ops.stats import StatsFlusher
from flashsale.web import events_stream
from flashsale.web.keys import AUTH, BACKENDS, METRICS
from flashsale.web.pages import static_page
from flashsale.web.replies import json_response

ASSETS = {"admin.js": "application/javascript", "admin.css": "text/css"}


async def page(_request: web.Request) -> web.Response:
    return static_page("admin.html", "text/html")


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    return static_page(name, ASSETS[name])


async def end_sale(request: web.Request) -> web.Response:
    request.app[AUTH].admin(request.headers.get("Authorization"))
    return json_response(await sales.end(request.app[BACKENDS], request.match_info["sale_id"]))


async def _stats_ctx(app: web.Application) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.ensure_future(StatsFlusher(app[BACKENDS], app[METRICS]).run(stop))
    yield
    stop.set()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(task, 2.0)


def setup(app: web.Application) -> None:
    """Routes and the stats flush; call after the backends' cleanup_ctx is appended."""
    app.router.add_get("/admin", page, allow_head=False)
    app.router.add_get("/admin/{name}", asset, allow_head=False)
    app.router.add_post("/api/v1/sales/{sale_id}/end", end_sale)
    events_stream.setup(app)
    app.cleanup_ctx.append(_stats_ctx)
