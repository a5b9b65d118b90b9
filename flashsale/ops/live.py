"""The live sales and their figures: what the dashboard, `flashsale status`
and the scrape-time gauges show.

The sales shown are the newest ``live_sales_max`` of the index of live sales
(flashsale/core/live_sales.py: created, not yet ended and drained): every
loop here costs what is live, not what is history. One snapshot of N live
sales is two PostgreSQL statements and one Redis pipeline.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
from redis.exceptions import ResponseError

from flashsale import validate
from flashsale.core import ledger, live_sales, sales
from flashsale.core.statuses import LEDGER_FIGURES, PERSISTED
from flashsale.ops import heartbeat
from flashsale.room.tickets import figures_many as room_figures

if TYPE_CHECKING:
    from flashsale.core.backends import Backends

FIGURES = LEDGER_FIGURES  # the ledger's figures, as the dashboard shows them


async def shown_rows(b: Backends) -> list[asyncpg.Record]:
    """The live sales shown: the newest ``live_sales_max`` of the index."""
    return await live_sales.rows(b, b.settings.live_sales_max)


def _int_or(raw: Any, default: int) -> int:
    if isinstance(raw, Exception) or raw is None:
        return default
    return int(raw)


async def figures(b: Backends, rows: list[asyncpg.Record]) -> list[dict[str, Any]]:
    """Per sale: the sale body, the ledger's figures and its verdict, the stream's state."""
    if not rows:
        return []
    ids = [r["sale_id"] for r in rows]
    sums: dict[str, dict[str, int]] = {i: dict.fromkeys(PERSISTED, 0) for i in ids}
    for r in await b.pg.fetch(
        "SELECT sale_id, status, sum(quantity)::bigint AS q FROM orders "
        "WHERE sale_id = ANY($1::text[]) GROUP BY sale_id, status",
        ids,
    ):
        sums[r["sale_id"]][r["status"]] = int(r["q"])
    group = b.settings.consumer_group
    async with b.redis.pipeline(transaction=False) as pipe:
        for i in ids:
            k = b.keys(i)
            pipe.hmget(k.sale, "available", "pending")
            pipe.xlen(k.stream)
            pipe.xpending(k.stream, group)
            pipe.xlen(k.dlq)
        got = await pipe.execute(raise_on_error=False)
    rooms = await room_figures(b, [r["sale_id"] for r in rows if r["waiting_room"] is not None])
    now = datetime.now(UTC)
    out = []
    for n, row in enumerate(rows):
        hm, lag, xp, dlq = got[4 * n : 4 * n + 4]
        if isinstance(hm, Exception):
            raise hm  # Redis does not answer: the caller reports it
        in_redis = hm[0] is not None
        available = _int_or(hm[0], int(row["stock"] - row["sold"]))
        figs = {
            "stock": int(row["stock"]), "available": available,
            "pending": _int_or(hm[1], 0), **sums[row["sale_id"]],
        }
        pending_entries = 0
        if isinstance(xp, dict):
            pending_entries = int(xp.get("pending") or 0)
        elif isinstance(xp, Exception) and not isinstance(xp, ResponseError):
            raise xp
        out.append({
            "sale": sales.body(row, available, now),
            "figures": figs,
            "consistent": ledger.is_consistent(figs, int(row["sold"]), in_redis),
            "in_redis": in_redis,
            "stream": {
                "lag": _int_or(lag, 0), "pending_entries": pending_entries,
                "dead_letters": _int_or(dlq, 0),
            },
            # the waiting room's figures (issue 12), None for a sale without one
            "waiting_room_figures": rooms.get(row["sale_id"]),
        })
    return out


async def snapshot(b: Backends) -> dict[str, Any]:
    """Every live sale's figures and the workers' liveness, now."""
    sale_figures = await figures(b, await shown_rows(b))
    workers = await heartbeat.workers(b)
    totals = {
        key: sum(s["stream"][key] for s in sale_figures)
        for key in ("lag", "pending_entries", "dead_letters")
    }
    return {
        "time": validate.iso(datetime.now(UTC)),
        "sales": sale_figures,
        "totals": totals,
        "workers": workers,
        "alive": heartbeat.alive_by_role(workers),
    }
