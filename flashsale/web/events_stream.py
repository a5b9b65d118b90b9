"""``GET /api/v1/admin/events``: the live figures as Server-Sent Events.

Admin bearer auth (a header: the dashboard reads the stream with fetch(), as
EventSource cannot send one). Every ``admin_events_interval_ms`` (at most a
second) an ``event: figures`` whose data is one JSON object: every live
sale's figures and stream state, the workers' liveness, and the last minutes
of reservations per second by outcome and p50/p99 latency, for the service
(``series``) and for each live sale shown (its ``series``, null when it had no
reservation in the window) (flashsale/ops/live.py, flashsale/ops/stats.py).
One snapshot per interval is shared by all the streams of a process; at most
``admin_streams_max`` streams at once (503 overloaded past that), each at most
STREAM_MAX_S long (the page reconnects), all ended when the process shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from flashsale import errors
from flashsale.ops import live
from flashsale.ops.stats import SeriesReader
from flashsale.web.keys import AUTH, BACKENDS, SETTINGS

if TYPE_CHECKING:
    from flashsale.core.backends import Backends

log = logging.getLogger("flashsale.web.events")

STREAM_MAX_S = 3600.0
RETRY_MS = 1000


class Snapshotter:
    """The live snapshot, computed at most once per interval for all streams."""

    def __init__(self, backends: Backends, interval_s: float) -> None:
        self._b = backends
        self._interval_s = interval_s
        self._lock = asyncio.Lock()
        self._series = SeriesReader(backends)
        self._at = float("-inf")
        self._last = b""

    async def get(self) -> bytes:
        async with self._lock:
            now = asyncio.get_running_loop().time()
            if now - self._at >= self._interval_s * 0.9:
                snap: dict[str, Any] = await live.snapshot(self._b)
                shown = [s["sale"]["sale_id"] for s in snap["sales"]]
                snap["series"], per_sale = await self._series.read(sale_ids=shown)
                for s in snap["sales"]:  # the same charts for each sale (None: no reservation)
                    s["series"] = per_sale.get(s["sale"]["sale_id"])
                snap["interval_ms"] = int(self._interval_s * 1000)
                self._last = orjson.dumps(snap)
                self._at = now
            return self._last


class Streams:
    """This process's event streams: how many are open, and the stop at shutdown."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.stop = asyncio.Event()
        self.snapshotter: Snapshotter | None = None


STREAMS = web.AppKey("admin_streams", Streams)


def _frame(event: str, data: bytes) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


async def events(request: web.Request) -> web.StreamResponse:
    request.app[AUTH].admin(request.headers.get("Authorization"))
    streams = request.app[STREAMS]
    if streams.open >= streams.limit:
        raise errors.Overloaded(f"at most {streams.limit} admin event streams at once")
    settings = request.app[SETTINGS]
    interval_s = settings.admin_events_interval_ms / 1000
    if streams.snapshotter is None:
        streams.snapshotter = Snapshotter(request.app[BACKENDS], interval_s)
    snapshotter = streams.snapshotter
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-store",
        "X-Accel-Buffering": "no",
    })
    streams.open += 1
    try:
        await resp.prepare(request)
        await resp.write(f"retry: {RETRY_MS}\n\n".encode())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STREAM_MAX_S
        while not streams.stop.is_set() and loop.time() < deadline:
            started = loop.time()
            try:
                frame = _frame("figures", await snapshotter.get())
            except Exception as exc:  # a backend down: say so, keep the stream
                log.warning("live snapshot failed: %r", exc)
                frame = _frame("error", orjson.dumps({"message": f"{type(exc).__name__}"}))
            await resp.write(frame)
            wait = max(0.0, interval_s - (loop.time() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(streams.stop.wait(), wait)
        return resp
    except ConnectionError:  # the page went away
        return resp
    finally:
        streams.open -= 1


async def _stop_streams(app: web.Application) -> None:
    app[STREAMS].stop.set()


def setup(app: web.Application) -> None:
    app[STREAMS] = Streams(app[SETTINGS].admin_streams_max)
    app.on_shutdown.append(_stop_streams)
    app.router.add_get("/api/v1/admin/events", events, allow_head=False)
