"""Typed application keys: every resource the handlers use hangs off the app."""

from __future__ import annotations

from aiohttp import web

from flashsale.admission import Admission
from flashsale.auth import Authenticator
from flashsale.backends import Backends
from flashsale.config import Settings
from flashsale.integrations import Integrations
from flashsale.metrics import Metrics
from flashsale.reserve import Reserver
from flashsale.web.rebuilds import Rebuilds

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
AUTH = web.AppKey("auth", Authenticator)
ADMISSION = web.AppKey("admission", Admission)
BACKENDS = web.AppKey("backends", Backends)
RESERVER = web.AppKey("reserver", Reserver)
REBUILDS = web.AppKey("rebuilds", Rebuilds)
INTEGRATIONS = web.AppKey("integrations", Integrations)
