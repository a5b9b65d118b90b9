"""`/metrics` and `/healthz` of a worker process (consume, compensate).

Off unless a port is configured (FLASHSALE_CONSUME_METRICS_PORT /
FLASHSALE_COMPENSATE_METRICS_PORT, or FLASHSALE_METRICS_PORT for either; 0
picks a free port, logged). ``/healthz`` is 200 while every loop of the
process runs, else 503; ``/metrics`` is the process's own registry
(persisted, reclaimed, dead-lettered, released...) plus
``flashsale_worker_up{role}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from flashsale.ops.metrics import Metrics
from flashsale.web.replies import json_response

log = logging.getLogger("flashsale.ops.worker_http")

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def build(metrics: Metrics, role: str, loops: Sequence[asyncio.Future[Any]]) -> web.Application:
    def running() -> bool:
        return not any(t.done() for t in loops)

    async def healthz(_request: web.Request) -> web.Response:
        if running():
            return json_response({"status": "ok", "role": role})
        return json_response(
            {"status": "unavailable", "role": role, "checks": {"loops": "error: a loop ended"}},
            503,
        )

    async def metrics_(_request: web.Request) -> web.Response:
        metrics.worker_up.labels(role).set(1 if running() else 0)
        return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/metrics", metrics_, allow_head=False)
    metrics.worker_up.labels(role).set(1)
    return app


@asynccontextmanager
async def serving(
    host: str, port: int | None, metrics: Metrics, role: str,
    loops: Sequence[asyncio.Future[Any]],
) -> AsyncIterator[int | None]:
    """Serve the endpoints while the block runs; yields the bound port (None: off)."""
    if port is None:
        yield None
        return
    runner = web.AppRunner(build(metrics, role, loops), access_log=None, handle_signals=False,
                           shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        log.info("%s metrics on http://%s:%d/metrics", role, host, bound)
        yield int(bound)
    finally:
        await runner.cleanup()
