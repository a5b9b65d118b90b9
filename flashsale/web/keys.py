"""Typed application keys: every resource the handlers use hangs off the app.

The types are named for the type checker only (``KEY: AppKey[T]``): this module
imports nothing of flashsale at run time, so every web module can use it
without pulling in the whole pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from flashsale.auth import Authenticator
    from flashsale.commerce.integrations import Integrations
    from flashsale.config import Settings
    from flashsale.core.backends import Backends
    from flashsale.core.reserve import Reserver
    from flashsale.ops.metrics import Metrics
    from flashsale.web.admission import Admission
    from flashsale.web.rebuilds import Rebuilds

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
AUTH: web.AppKey[Authenticator] = web.AppKey("auth")
ADMISSION: web.AppKey[Admission] = web.AppKey("admission")
BACKENDS: web.AppKey[Backends] = web.AppKey("backends")
RESERVER: web.AppKey[Reserver] = web.AppKey("reserver")
REBUILDS: web.AppKey[Rebuilds] = web.AppKey("rebuilds")
INTEGRATIONS: web.AppKey[Integrations] = web.AppKey("integrations")
LOTTERY: web.AppKey[Callable[[], int]] = web.AppKey("lottery")  # room/tickets.lottery_draws
