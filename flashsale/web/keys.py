"""Typed application keys: every resource the handlers use hangs off the app.

The types are named for the type checker only (``AppKey["T"]``): this module
imports nothing of flashsale at run time, so every web module can use it
without pulling in the whole pipeline.
"""

from __future__ import annotations

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

SETTINGS = web.AppKey["Settings"]("settings")
METRICS = web.AppKey["Metrics"]("metrics")
AUTH = web.AppKey["Authenticator"]("auth")
ADMISSION = web.AppKey["Admission"]("admission")
BACKENDS = web.AppKey["Backends"]("backends")
RESERVER = web.AppKey["Reserver"]("reserver")
REBUILDS = web.AppKey["Rebuilds"]("rebuilds")
INTEGRATIONS = web.AppKey["Integrations"]("integrations")
