"""Cost independent of history: the bench on a database that has been in use.

A second fresh database gets 10,000 ended sales and 1,000,000 orders (one SQL
``generate_series`` statement each; every sale sold out, its orders paid or
shipped, so it is consistent). Then the same reserve system (1 worker) and the
same consumer drain run on it, and the rates are compared with the fresh
database's from the same bench run. Last, the idle CPU of ``flashsale consume``
and ``flashsale compensate`` (no load, no live sale) on a database with no sales
and on the one with history: a loop that walks every sale ever made shows here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from bench import procs
from bench.drain import DrainResult, measure_drain
from bench.lab import Lab
from bench.measure import SystemResult, measure
from bench.targets import FlashsaleTarget

SALES = 10_000
ORDERS = 1_000_000
IDLE_START_S = 3.0
IDLE_S = 5.0

def _populate_sql(sales: int, orders: int) -> list[str]:
    per_sale = max(1, orders // sales)
    return [
        f"""
        INSERT INTO sales (sale_id, sku, name, price_cents, stock, sold, per_user_limit,
                           starts_at, ends_at, hold_seconds, created_at, drained_at)
        SELECT 'sl_h' || lpad(g::text, 11, '0'), 'HIST-' || g, 'ended sale ' || g, 1999,
               {per_sale}, {per_sale}, 1,
               now() - interval '400 days' + g * interval '1 minute',
               now() - interval '400 days' + g * interval '1 minute' + interval '10 minutes', 600,
               now() - interval '400 days' + g * interval '1 minute',
               -- ended and drained long ago, as the live-sales index leaves them
               now() - interval '400 days' + g * interval '1 minute' + interval '2 hours'
        FROM generate_series(1, {sales}) AS g
        """,
        f"""
        INSERT INTO orders (order_id, sale_id, user_id, quantity, amount_cents, status,
                            idempotency_key, created_at, expires_at, updated_at, payment_id,
                            shipment_id, tracking_number)
        SELECT s || '-' || lpad(to_hex(g), 11, '0') || 'h0', s, 'buyer' || (g / {sales}), 1,
               1999, CASE WHEN g % 3 = 0 THEN 'shipped' ELSE 'paid' END, 'hist-' || g, t,
               t + interval '10 minutes', t + interval '1 minute', 'pay_h' || g,
               CASE WHEN g % 3 = 0 THEN 'shp_h' || g END,
               CASE WHEN g % 3 = 0 THEN 'TRK' || g END
        FROM (SELECT g, 'sl_h' || lpad((g % {sales} + 1)::text, 11, '0') AS s,
                     now() - interval '400 days' + (g % {sales} + 1) * interval '1 minute' AS t
              FROM generate_series(0, {per_sale * sales - 1}) AS g) AS x
        """,
        "ANALYZE",
    ]


async def populate(dsn: str, sales: int = SALES, orders: int = ORDERS) -> float:
    """The history; returns the seconds it took."""
    t0 = time.monotonic()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET synchronous_commit = off")
        for sql in _populate_sql(sales, orders):
            await conn.execute(sql)
    finally:
        await conn.close()
    return time.monotonic() - t0


@dataclass
class HistoryResult:
    sales: int = 0
    orders: int = 0
    populate_s: float = 0.0
    reserve: SystemResult | None = None
    drain: DrainResult | None = None
    idle: dict[str, dict[str, float]] = field(default_factory=dict)  # db -> process -> cores
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and (self.reserve is None or self.reserve.ok) and (
            self.drain is None or self.drain.ok)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sales": self.sales, "orders": self.orders, "populate_s": round(self.populate_s, 1),
            "reserve": self.reserve.as_dict() if self.reserve else None,
            "drain": self.drain.as_dict() if self.drain else None,
            "idle_cores": self.idle, "error": self.error,
        }


async def idle_cpu(lab: Lab) -> dict[str, float]:
    """Cores used by an idle consume and compensate process (and the servers) on lab.dsn."""
    env = lab.child_env()
    tag = lab.dsn.rsplit("/", 1)[-1]
    kids = [
        procs.start(f"idle-consume-{tag}", procs.python_module("flashsale", "consume"), env,
                    lab.logs),
        procs.start(f"idle-compensate-{tag}", procs.python_module("flashsale", "compensate"),
                    env, lab.logs),
    ]
    try:
        await asyncio.sleep(IDLE_START_S if not lab.opts.quick else 1.0)
        for k in kids:
            if not k.alive():
                raise RuntimeError(f"{k.name} exited:\n{k.tail()}")
        meter = procs.CpuMeter({"consume": [kids[0].pid], "compensate": [kids[1].pid],
                                **lab.server_pids})
        window = IDLE_S if not lab.opts.quick else 1.0
        meter.begin()
        await asyncio.sleep(window)
        cpu = meter.end()
    finally:
        for k in kids:
            await asyncio.to_thread(k.stop)
    return {k: round(v / window, 4) for k, v in cpu.items() if k != "_machine"}


async def measure_history(
    lab: Lab, new_database: Callable[[], AbstractAsyncContextManager[str]],
) -> HistoryResult:
    """Reserve (1 worker), drain and idle CPU on a database with history."""
    opts = lab.opts
    result = HistoryResult()
    sales, orders = (200, 20_000) if opts.quick else (SALES, ORDERS)
    try:
        async with new_database() as empty_dsn:
            result.idle["fresh"] = await idle_cpu(dataclasses.replace(lab, dsn=empty_dsn))
        async with new_database() as dsn:
            result.populate_s = await populate(dsn, sales, orders)
            result.sales, result.orders = sales, orders
            print(f"  history: {sales:,} ended sales and {orders:,} orders written in "
                  f"{result.populate_s:.1f} s", flush=True)
            hlab = dataclasses.replace(lab, dsn=dsn, opts=dataclasses.replace(
                opts, runs=max(1, opts.runs - 1)))
            result.idle["history"] = await idle_cpu(hlab)
            print(f"  idle cores, fresh {result.idle['fresh']} / history "
                  f"{result.idle['history']}", flush=True)
            target = FlashsaleTarget(hlab, "history_reserve_w1",
                                     "flashsale reserve, history db (1 worker)", 1)
            print(f"== {target.label}", flush=True)
            result.reserve = await measure(hlab, target, "history_reserve")
            print(f"== consumer drain, history db (backlog {opts.drain_orders:,})", flush=True)
            result.drain = await measure_drain(hlab)
    except Exception as exc:  # keep the other figures
        result.error = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"  history: FAILED: {result.error}", flush=True)
    return result
