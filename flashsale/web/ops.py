"""Operations endpoints: liveness, readiness, metrics, the OpenAPI document."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from flashsale.core import migrate
from flashsale.ops import observe
from flashsale.web.keys import BACKENDS, METRICS
from flashsale.web.openapi import build_openapi
from flashsale.web.replies import json_response

CHECK_TIMEOUT_S = 1.0


async def healthz(_request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _check(coro: Any) -> str:
    try:
        ok = await asyncio.wait_for(coro, CHECK_TIMEOUT_S)
    except Exception as exc:  # any failure of a check is "not ready", with its reason
        return f"error: {type(exc).__name__}"
    return "ok" if ok else "error: not ready"


async def readyz(request: web.Request) -> web.Response:
    b = request.app[BACKENDS]

    async def pg_current() -> bool:
        async with b.pg.acquire(timeout=CHECK_TIMEOUT_S) as conn:
            return await migrate.is_current(conn)

    async def redis_ok() -> bool:
        return bool(await b.redis.ping())

    async def scripts_ok() -> bool:
        if await b.scripts.all_loaded(b.redis):
            return True
        await b.scripts.preload(b.redis)  # Redis restarted with an empty cache
        return await b.scripts.all_loaded(b.redis)

    names = ("redis", "postgres", "scripts")
    results = await asyncio.gather(_check(redis_ok()), _check(pg_current()), _check(scripts_ok()))
    checks = dict(zip(names, results, strict=True))
    if all(v == "ok" for v in checks.values()):
        return json_response({"status": "ok", "checks": checks})
    resp = json_response({"status": "unavailable", "checks": checks}, 503)
    resp.headers["Retry-After"] = "1"
    return resp


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    await observe.scrape(request.app[BACKENDS], m)  # flashsale/ops/observe.py
    return web.Response(
        body=m.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


async def openapi(_request: web.Request) -> web.Response:
    return json_response(build_openapi())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/metrics", metrics, allow_head=False)
    app.router.add_get("/openapi.json", openapi, allow_head=False)
