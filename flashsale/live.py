"""The live sales and their figures: what the dashboard, `flashsale status`,
`reconcile --all` and the scrape-time gauges show.

A sale is live from its creation until ``live_ended_grace_s`` after it ended
(its holds settle meanwhile), at most ``live_sales_max`` of them, newest
first: every loop here costs what is live, not what is history. One snapshot
of N live sales is two PostgreSQL statements and one Redis pipeline.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.exceptions import ResponseError

from flashsale import heartbeat, ledger, sales, validate
from flashsale.backends import Backends
from flashsale.room.tickets import figures_many as room_figures

FIGURES = ("stock", "available", "pending", *ledger.STATUSES)


async def live_sale_rows(b: Backends) -> list[asyncpg.Record]:
    return list(
        await b.pg.fetch(
            "SELECT * FROM sales WHERE ends_at IS NULL "
            "OR ends_at > now() - make_interval(secs => $1) "
            "ORDER BY created_at DESC, sale_id LIMIT $2",
            b.settings.live_ended_grace_s, b.settings.live_sales_max,
        )
    )


def _int_or(raw: Any, default: int) -> int:
    if isinstance(raw, Exception) or raw is None:
        return default
    return int(raw)


async def figures(b: Backends, rows: list[asyncpg.Record]) -> list[dict[str, Any]]:
    """Per sale: the sale body, the ledger's figures and its verdict, the stream's state."""
    if not rows:
        return []
    ids = [r["sale_id"] for r in rows]
    sums: dict[str, dict[str, int]] = {i: dict.fromkeys(ledger.STATUSES, 0) for i in ids}
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
    sale_figures = await figures(b, await live_sale_rows(b))
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
