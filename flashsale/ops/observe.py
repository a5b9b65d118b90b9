"""Scrape-time gauges of the front's /metrics: live sales, stream lag, backends, workers.

Computed when Prometheus scrapes (one live snapshot, flashsale/ops/live.py), so
they cost nothing between scrapes. The sale id is a label only here, where
the number of live sales is bounded (``live_sales_max``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from flashsale.commerce import payment_inbox
from flashsale.core import live_sales
from flashsale.ops import live
from flashsale.ops.metrics import Metrics

if TYPE_CHECKING:
    from flashsale.core.backends import Backends

log = logging.getLogger("flashsale.ops.observe")

CHECK_TIMEOUT_S = 1.0


async def _ready(b: Backends) -> tuple[bool, bool]:
    async def redis_ok() -> bool:
        return bool(await b.redis.ping())

    async def pg_ok() -> bool:
        return bool(await b.pg.fetchval("SELECT 1", timeout=CHECK_TIMEOUT_S) == 1)

    results = await asyncio.gather(
        asyncio.wait_for(redis_ok(), CHECK_TIMEOUT_S), asyncio.wait_for(pg_ok(), CHECK_TIMEOUT_S),
        return_exceptions=True,
    )
    return results[0] is True, results[1] is True


async def stream_lag(b: Backends) -> int:
    """Accepted orders not yet persisted, over every live sale (one pipeline)."""
    sale_ids = await live_sales.ids(b)
    async with b.redis.pipeline(transaction=False) as pipe:
        for sale_id in sale_ids:
            pipe.xlen(b.keys(sale_id).stream)
        lengths = await pipe.execute()
    return sum(int(x) for x in lengths)


async def scrape(b: Backends, m: Metrics) -> None:
    """Everything the front's /metrics computes when it is scraped."""
    try:
        m.stream_lag.set(await stream_lag(b))
    except Exception:  # metrics must answer even when a backend does not
        m.stream_lag.set(float("nan"))
    try:
        waiting, oldest_age_s = await payment_inbox.inbox_stats(b)
        m.payment_inbox_events.set(waiting)
        m.payment_inbox_oldest_age.set(oldest_age_s)
    except Exception:  # as above
        m.payment_inbox_events.set(float("nan"))
        m.payment_inbox_oldest_age.set(float("nan"))
    await refresh(b, m)


def _rooms(m: Metrics, sales: list[dict[str, Any]]) -> None:
    """The waiting rooms' gauges (issue 12), one set per live sale with a room."""
    for g in (m.room_tickets, m.room_admit_rate, m.room_last_eta, m.room_paused):
        g.clear()
    for s in sales:
        w = s.get("waiting_room_figures")
        if not w:
            continue
        sid = s["sale"]["sale_id"]
        m.room_tickets.labels(sid, "waiting").set(w["waiting"])
        m.room_tickets.labels(sid, "admitted").set(w["admitted_outstanding"])
        for state in ("admitted_total", "used", "expired"):
            m.room_tickets.labels(sid, state).set(w[state])
        m.room_admit_rate.labels(sid, "configured").set(w["admit_per_s"])
        m.room_admit_rate.labels(sid, "measured").set(w["measured_admit_per_s"])
        m.room_paused.labels(sid).set(1 if w["paused"] else 0)
        if w["eta_last_low_s"] is not None:
            m.room_last_eta.labels(sid, "low").set(w["eta_last_low_s"])
            m.room_last_eta.labels(sid, "high").set(w["eta_last_high_s"])


async def refresh(b: Backends, m: Metrics) -> None:
    """The live sales' figures, the backends' readiness, the workers' liveness."""
    redis_ok, pg_ok = await _ready(b)
    m.backend_ready.labels("redis").set(1 if redis_ok else 0)
    m.backend_ready.labels("postgres").set(1 if pg_ok else 0)
    if not (redis_ok and pg_ok):
        return  # the figures would be stale: leave them out rather than lie
    try:
        snap = await asyncio.wait_for(live.snapshot(b), CHECK_TIMEOUT_S * 2)
    except Exception as exc:  # metrics must answer even when a backend does not
        log.warning("live figures for /metrics failed: %r", exc)
        return
    m.sale_units.clear()
    m.sale_consistent.clear()
    m.sale_stream.clear()
    for s in snap["sales"]:
        sid = s["sale"]["sale_id"]
        for fig in live.FIGURES:
            m.sale_units.labels(sid, fig).set(s["figures"][fig])
        m.sale_consistent.labels(sid).set(1 if s["consistent"] else 0)
        m.sale_stream.labels(sid, "lag").set(s["stream"]["lag"])
        m.sale_stream.labels(sid, "pending").set(s["stream"]["pending_entries"])
        m.sale_stream.labels(sid, "dead_letter").set(s["stream"]["dead_letters"])
    _rooms(m, snap["sales"])
    m.live_sales.set(len(snap["sales"]))
    m.stream_pending.set(snap["totals"]["pending_entries"])
    m.dead_letters.set(snap["totals"]["dead_letters"])
    m.ledger_inconsistent.set(sum(1 for s in snap["sales"] if not s["consistent"]))
    for role, n in snap["alive"].items():
        m.workers_alive.labels(role).set(n)
