"""The app factory: pools and background tasks opened and closed in cleanup_ctx.

The app runs whatever background loops it is handed (``LoopsFor``: the roles'
one list, flashsale/run/roles.py, given by the CLI and the tests); the HTTP
front itself knows no loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from flashsale.auth import Authenticator
from flashsale.commerce.integrations import Integrations
from flashsale.config import Settings
from flashsale.core.backends import Backends, open_backends
from flashsale.core.reserve import Reserver
from flashsale.ops import heartbeat
from flashsale.ops.metrics import Metrics
from flashsale.room.tickets import lottery_draws
from flashsale.web import admin, ops, payments, request_id, room, routes
from flashsale.web.admission import Admission
from flashsale.web.keys import (
    ADMISSION,
    AUTH,
    BACKENDS,
    INTEGRATIONS,
    LOTTERY,
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


@dataclass(frozen=True, slots=True)
class Workers:
    """Which background loops this process runs beside the HTTP front."""

    consumer: bool = False
    compensator: bool = False
    saga: bool = False  # the fulfilment saga and the notifier; also run with the compensator

    @property
    def any(self) -> bool:
        return self.consumer or self.compensator or self.saga


class LoopsFor(Protocol):
    """Builds the background loops of the roles asked for (``flashsale.run.roles.loops``)."""

    def __call__(
        self, b: Backends, m: Metrics, *, consumer: bool, compensator: bool, saga: bool,
        integrations: Integrations | None,
    ) -> list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]]: ...


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


def _workers_ctx(
    workers: Workers, loops_for: LoopsFor | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        b, m = app[BACKENDS], app[METRICS]
        loops = [] if loops_for is None else loops_for(
            b, m, consumer=workers.consumer, compensator=workers.compensator,
            saga=workers.saga, integrations=app[INTEGRATIONS] if (
                workers.saga or workers.compensator) else None,
        )
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


def create_app(
    settings: Settings, workers: Workers | None = None, loops_for: LoopsFor | None = None,
) -> web.Application:
    """The HTTP front; with ``workers``, also their loops, built by ``loops_for``."""
    workers = workers or Workers()
    if workers.any and loops_for is None:
        raise ValueError("workers need their loops: pass loops_for (flashsale.run.roles.loops)")
    app = web.Application(
        middlewares=[request_id_middleware, error_middleware],
        client_max_size=settings.body_max_bytes,
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[AUTH] = Authenticator(settings.jwt_secret, settings.admin_token)
    app[LOTTERY] = lottery_draws(settings.room_lottery_seed)
    app[ADMISSION] = Admission(
        user_rate_per_s=settings.rate_user_per_s, user_burst=settings.rate_user_burst,
        global_rate_per_s=settings.rate_global_per_s,
        limited_delay_s=settings.rate_limited_delay_s,
    )
    app.cleanup_ctx.append(_backends_ctx)
    app.cleanup_ctx.append(_workers_ctx(workers, loops_for))
    routes.add_routes(app)
    ops.add_routes(app)
    payments.setup(app)
    admin.setup(app)  # the operator's view: /admin, end sale, the live event stream
    room.setup(app)  # the waiting room (contract v1.1)
    request_id.setup(app)
    return app
