"""The waiting room (issue 12) on real Redis and PostgreSQL: FIFO after the
start, the lottery before it, the rate for the whole sale, abandonment, the
stock bound and sold_out, the pass, and a sale without a room unchanged.

Where time matters the room scripts are driven with a simulated clock (every
room script takes now_ms in ARGV): one admission per call, in a known order,
without waiting for wall-clock seconds."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flashsale.backends import Backends
from flashsale.config import Settings
from flashsale.room import keys as rk
from flashsale.room import passes
from flashsale.room.admitter import Admitter
from flashsale.room.tickets import new_ticket_id
from flashsale.validate import iso
from tests.support import Api

ROOM = {"admit_per_s": 1000, "pass_seconds": 60}


def now_ms() -> int:
    return int(time.time() * 1000)


async def room_sale(api: Api, room: dict[str, Any] | None = None, **fields: Any) -> str:
    sale = await api.create_sale(waiting_room=room or ROOM, **fields)
    assert sale["waiting_room"] is not None
    return str(sale["sale_id"])


async def join(api: Api, sid: str, user: str) -> tuple[int, Any]:
    status, body, _ = await api.request(
        "POST", f"/api/v1/sales/{sid}/queue", headers=api.buyer(user)
    )
    return status, body


async def poll(api: Api, sid: str, ticket: str, user: str) -> tuple[int, Any]:
    status, body, _ = await api.request(
        "GET", f"/api/v1/sales/{sid}/queue/{ticket}", headers=api.buyer(user)
    )
    return status, body


async def admit_at(b: Backends, sid: str, at_ms: int, batch_max: int = 1) -> int:
    """One admission call at a simulated instant; how many it admitted."""
    res = await b.scripts.room_admit(
        keys=rk.admit_keys(b.keys(sid)), args=[at_ms, batch_max, 1000, 10_000]
    )
    assert int(res[0]) == 0, res
    return int(res[1])


async def join_direct(b: Backends, sid: str, users: list[str], at_ms: int) -> list[str]:
    """Tickets taken through the join script itself (fast, for thousands)."""
    k = b.keys(sid)
    async with b.redis.pipeline(transaction=False) as pipe:
        for u in users:
            await b.scripts.room_join(
                keys=rk.join_keys(k),
                args=[at_ms, u, new_ticket_id(), secrets.randbits(53), 10**6, 120_000],
                client=pipe,
            )
        got = await pipe.execute()
    assert all(int(g[0]) == 0 for g in got), got[:3]
    return [g[1].decode() for g in got]


async def admission_order(b: Backends, sid: str) -> list[str]:
    """Admitted tickets, by admission time (their pass expiry = admitted + pass time)."""
    recs = await b.redis.hgetall(b.keys(sid).room_tickets)
    admitted = []
    for t, rec in recs.items():
        state, exp, _user = rec.decode().split("\t", 2)
        if state == "a":
            admitted.append((int(exp), t.decode()))
    return [t for _exp, t in sorted(admitted)]


def spearman(a: list[int], b: list[int]) -> float:
    n = len(a)
    d2 = sum((x - y) ** 2 for x, y in zip(a, b, strict=True))
    return 1 - 6 * d2 / (n * (n * n - 1))


# -- FIFO and the lottery ----------------------------------------------------------------


async def test_fifo_after_the_start(api: Api) -> None:
    """500 tickets taken one after another after the start are admitted in that order."""
    b = api.backends
    sid = await room_sale(api, stock=1000)
    joined = []
    for i in range(500):
        status, t = await join(api, sid, f"fifo-{i}")
        assert status == 201 and t["state"] == "waiting" and t["position"] == i, t
        joined.append(t["ticket_id"])
    base = now_ms()
    for i in range(500):
        assert await admit_at(b, sid, base + i) == 1
    assert await admission_order(b, sid) == joined


async def test_lottery_before_the_start(api: Api) -> None:
    """2,000 tickets taken before the start are admitted in an order that does
    not follow the join order (|Spearman rho| < 0.1); later arrivals come after
    them, in arrival order."""
    b = api.backends
    starts = datetime.now(UTC) + timedelta(seconds=40)
    sid = await room_sale(api, stock=10_000, starts_at=iso(starts))
    joined = []
    for i in range(2000):
        status, t = await join(api, sid, f"lot-{i}")
        assert status == 201 and t["state"] == "waiting" and t["position"] is None, t
        assert t["eta_seconds"] is not None and t["eta_seconds"]["low"] >= 1, t
        joined.append(t["ticket_id"])
    start_ms = int(starts.timestamp() * 1000)
    late = await join_direct(b, sid, ["late-1", "late-2", "late-3"], start_ms + 1)
    for i in range(2003):
        assert await admit_at(b, sid, start_ms + 10 + i) == 1
    order = await admission_order(b, sid)
    assert order[2000:] == late, "after the start: FIFO, behind the lottery"
    rank = {t: i for i, t in enumerate(order)}
    rho = spearman(list(range(2000)), [rank[t] for t in joined])
    print(f"lottery of 2,000: Spearman rho = {rho:+.4f}")
    assert abs(rho) < 0.1, rho


CHI2_1PCT_DOF_49 = 74.919  # chi-square critical value, 49 degrees of freedom, 1 %


async def test_lottery_favours_no_join_slot(api: Api) -> None:
    """Over 800 lotteries of 8 tickets, the rank each join slot is admitted at
    is uniform: chi-square of the 8x8 slot-by-rank table at 1 %."""
    b = api.backends
    n, runs = 8, 800
    counts = [[0] * n for _ in range(n)]
    future = now_ms() + 3_600_000
    for run in range(runs):
        sid = f"sl_lot{run:09d}"
        k = b.keys(sid)
        loaded = await b.scripts.load_sale(
            keys=[k.sale, k.stream, k.restocks],
            args=[100, 1, 100, future, 0, 60_000, "persist", 1000, 60_000, "2.0", "0"],
        )
        assert int(loaded) == 1
        joined = await join_direct(b, sid, [f"u{i}" for i in range(n)], future - 1000)
        async with b.redis.pipeline(transaction=False) as pipe:
            for i in range(n):
                await b.scripts.room_admit(
                    keys=rk.admit_keys(k), args=[future + 1 + i, 1, 1000, 10_000], client=pipe
                )
            await pipe.execute()
        rank = {t: i for i, t in enumerate(await admission_order(b, sid))}
        for slot, t in enumerate(joined):
            counts[slot][rank[t]] += 1
    expected = runs / n
    chi2 = sum((c - expected) ** 2 / expected for row in counts for c in row)
    print(f"lottery slot x rank chi-square = {chi2:.1f} (1 % critical {CHI2_1PCT_DOF_49})")
    assert chi2 < CHI2_1PCT_DOF_49, counts
