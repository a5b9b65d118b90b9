"""The app factory: pools and background tasks opened and closed in cleanup_ctx."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from flashsale import heartbeat, ledger
from flashsale.admission import Admission
from flashsale.auth import Authenticator
from flashsale.backends import open_backends
from flashsale.compensate import Compensator
from flashsale.config import Settings
from flashsale.events import Notifier
from flashsale.metrics import Metrics
from flashsale.persist import run_consumers
from flashsale.reserve import Reserver
from flashsale.room.admitter import Admitter
from flashsale.saga import SagaRunner
from flashsale.web import admin, ops, payments, request_id, room, routes
from flashsale.web.keys import (
    ADMISSION,
    AUTH,
    BACKENDS,
    INTEGRATIONS,
    METRICS,
    REBUILDS,
    RESERVER,
    SETTINGS,
)
from flashsale.web.middleware import error_middleware
from flashsale.web.rebuilds import Rebuilds
from flashsale.web.request_id import request_id_middleware

log = logging.getLogger("flashsale.app")

STOP_TIMEOUT_S = 5.0
REBUILD_INTERVAL_S = 5.0


@dataclass(frozen=True, slots=True)
class Workers:
    """Which background loops this process runs beside the HTTP front."""

    consumer: bool = False
    compensator: bool = False
    saga: bool = False  # the fulfilment saga and the notifier; also run with the compensator


async def _backends_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_backends(app[SETTINGS], guarded=True) as b:
        app[BACKENDS] = b
        app[REBUILDS] = Rebuilds(b)
        await app[REBUILDS].verify()  # Redis checked against PostgreSQL before any use
        try:
            await b.scripts.preload(b.redis)
        except Exception as exc:  # readiness reports it; EVALSHA reloads on NOSCRIPT
            log.warning("could not preload scripts: %r", exc)
        app[RESERVER] = Reserver(b)
        yield
        await app[RESERVER].close()
        await app[REBUILDS].close()


async def _periodic_rebuild(app: web.Application, stop: asyncio.Event) -> None:
    """Detect sales whose Redis state is gone, or lost writes PostgreSQL has
    (stream behind the persisted watermark), and rebuild them, at start and on
    a schedule."""
    while not stop.is_set():
        try:
            rebuilt = await ledger.rebuild_missing(app[BACKENDS])
            if rebuilt:
                log.warning("rebuilt %d sale(s) missing in Redis or behind PostgreSQL",
                            len(rebuilt))
        except Exception as exc:
            log.warning("rebuild sweep failed: %r", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), REBUILD_INTERVAL_S)


def _workers_ctx(
    workers: Workers,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        loops: list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = []
        b, m = app[BACKENDS], app[METRICS]
        if workers.consumer:
            loops.append(lambda ev: run_consumers(b, m, ev))
        if workers.compensator:
            loops.append(Compensator(b, m).run)
            loops.append(lambda ev: _periodic_rebuild(app, ev))
            loops.append(Admitter(b).run)  # the waiting rooms' one admission loop
        if workers.saga or workers.compensator:
            loops.append(SagaRunner(b, app[INTEGRATIONS]).run)
            loops.append(Notifier(b).run)
        tasks: list[asyncio.Task[None]] = [asyncio.ensure_future(loop(stop)) for loop in loops]
        tasks += heartbeat.start(b, workers.consumer, workers.compensator, tasks, stop)
        yield
        stop.set()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return ctx


def create_app(settings: Settings, workers: Workers | None = None) -> web.Application:
    app = web.Application(
        middlewares=[request_id_middleware, error_middleware],
        client_max_size=settings.body_max_bytes,
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[AUTH] = Authenticator(settings.jwt_secret, settings.admin_token)
    app[ADMISSION] = Admission(
        user_rate_per_s=settings.rate_user_per_s, user_burst=settings.rate_user_burst,
        global_rate_per_s=settings.rate_global_per_s,
        limited_delay_s=settings.rate_limited_delay_s,
    )
    app.cleanup_ctx.append(_backends_ctx)
    app.cleanup_ctx.append(_workers_ctx(workers or Workers()))
    routes.add_routes(app)
    ops.add_routes(app)
    payments.setup(app)
    admin.setup(app)  # the operator's view: /admin, end sale, the live event stream
    room.setup(app)  # the waiting room (contract v1.1)
    request_id.setup(app)
    return app
