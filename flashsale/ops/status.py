"""`flashsale status` (the dashboard's numbers in a terminal: the newest
``live_sales_max`` live sales) and `flashsale reconcile --all` (every live
sale's ledger, the whole index paged through, with a progress bar)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any, TextIO

from flashsale import errors
from flashsale.core import ledger, live_sales
from flashsale.core.backends import Backends
from flashsale.ops import live

COLUMNS = (
    ("sale", 16), ("status", 8), ("stock", 9), ("available", 9), ("pending", 8),
    ("awaiting", 8), ("paid", 8), ("shipped", 8), ("expired", 8), ("cancelled", 9),
    ("failed", 7), ("lag", 6), ("pel", 6), ("dlq", 5), ("ledger", 6),
)
WATCH_INTERVAL_MIN_S = 0.2
WATCH_INTERVAL_MAX_S = 60.0
BAR_WIDTH = 30
RECONCILE_PAGE = 200  # live sales read per statement by reconcile --all


def table(snap: dict[str, Any]) -> str:
    head = " ".join(f"{name:>{w}}" if i else f"{name:<{w}}" for i, (name, w) in
                    enumerate(COLUMNS))
    lines = [head, "-" * len(head)]
    for s in snap["sales"]:
        f, st = s["figures"], s["stream"]
        cells = [
            s["sale"]["sale_id"], s["sale"]["status"], f["stock"], f["available"], f["pending"],
            f["awaiting_payment"], f["paid"], f["shipped"], f["expired"], f["cancelled"],
            f["failed"], st["lag"], st["pending_entries"], st["dead_letters"],
            "ok" if s["consistent"] else "BAD",
        ]
        lines.append(" ".join(
            f"{c!s:<{w}}" if i == 0 else f"{c!s:>{w}}"
            for i, (c, (_n, w)) in enumerate(zip(cells, COLUMNS, strict=True))
        ))
    if not snap["sales"]:
        lines.append("(no live sales)")
    alive = ", ".join(f"{role} {n} alive" if n else f"{role} NOT RUNNING"
                      for role, n in snap["alive"].items())
    t = snap["totals"]
    lines.append("")
    lines.append(f"{snap['time']}  workers: {alive}  |  lag {t['lag']}  pending entries "
                 f"{t['pending_entries']}  dead letters {t['dead_letters']}")
    return "\n".join(lines)


async def status(b: Backends, *, watch: bool, interval_s: float, out: TextIO,
                 stop: asyncio.Event | None = None) -> int:
    """Print the table once, or redraw it every ``interval_s`` until ``stop``."""
    interval_s = min(max(interval_s, WATCH_INTERVAL_MIN_S), WATCH_INTERVAL_MAX_S)
    while True:
        text = table(await live.snapshot(b))
        if watch and out.isatty():
            out.write("\x1b[H\x1b[2J")  # home, clear screen
        out.write(text + "\n")
        out.flush()
        if not watch or (stop is not None and stop.is_set()):
            return 0
        if stop is None:
            await asyncio.sleep(interval_s)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            if stop.is_set():
                return 0
        if watch and not out.isatty():
            out.write("\n")


def _bar(done: int, total: int, bad: int) -> str:
    filled = BAR_WIDTH * done // total if total else BAR_WIDTH
    return (f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} sales"
            f"  inconsistent: {bad}")


async def reconcile_all(
    b: Backends, out: TextIO, progress: TextIO = sys.stderr, page_size: int = RECONCILE_PAGE,
) -> int:
    """Check every live sale's ledger (the whole index of live sales, read a
    page of ``page_size`` at a time); print the inconsistent ones; 1 if any."""
    total = await live_sales.count(b)
    done = 0
    bad: list[tuple[str, dict[str, Any]]] = []
    async for page in live_sales.pages(b, page_size):
        for sale_id in page:
            done += 1
            total = max(total, done)  # sales created meanwhile
            try:
                figs = await ledger.ledger(b, sale_id)
            except errors.FlashsaleError:  # gone meanwhile
                continue
            if not figs["consistent"]:
                bad.append((sale_id, figs))
            progress.write(_bar(done, total, len(bad)))
            progress.flush()
    progress.write(_bar(done, done, len(bad)) + "\n")
    for sale_id, figs in bad:
        shown = " ".join(f"{k}={figs[k]}" for k in live.FIGURES)
        out.write(f"INCONSISTENT {sale_id}: {shown} sold={figs['sold']} "
                  f"in_redis={figs['in_redis']}\n")
    out.write(f"{done} live sale(s) checked, {len(bad)} inconsistent\n")
    return 1 if bad else 0
