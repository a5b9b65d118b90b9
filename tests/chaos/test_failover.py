"""Redis failover under load, Jepsen-style: kill -9 (or SIGSTOP) the primary
of a real Sentinel topology while buyers reserve, and check every answer.

Topology (flashsale/run/embedded/sentinel.py, per test): a primary, a replica,
three sentinels (down-after 1000 ms, failover-timeout 3000 ms), both data
nodes with min-replicas-to-write 1. Three flashsale children, ``serve``,
``consume`` and ``compensate``, find the primary through the sentinels
(FLASHSALE_REDIS_SENTINELS) and are never restarted.

Load: several buyers in parallel, unique Idempotency-Keys, one request at a
time each, a 503 / transport error retried with the same key until decided;
two sales: one with stock to spare, one oversubscribed several times.

Each cycle kills the current primary (kill -9), waits for the sentinels to
promote the replica, and starts the old one again, empty, as a replica of
the new one. Afterwards (load stopped, every key decided, queues drained)
tests/chaos/history.py checks every operation: lost 0, duplicated 0,
unexpected 0 (every 503 reserved nothing or its retry accounts for it),
accepted <= stock, ledger consistent.

With FLASHSALE_REDIS_REPLICA_ACKS=1 (the Sentinel default) all of it must
hold. With 0 the same run measures what the acknowledgement buys (lost
orders are counted, not asserted). ``test_failover_pause`` stops the primary
longer than the failover takes, then lets it run again: it wakes up as a
primary holding its clients' requests, and must accept nothing that is lost.

Chaos (``make chaos``): FAILOVER_CYCLES cycles (default 10). The normal suite
runs 2 cycles with acks on.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from flashsale.backends import open_backends
from flashsale.config import Settings
from flashsale.embedded import free_port
from flashsale.run.embedded.sentinel import SentinelTopology
from tests.chaos.conftest import Figures
from tests.chaos.faultkit import wait_http
from tests.chaos.harness import Services, flashsale_env
from tests.chaos.history import HttpReader, Verdict
from tests.sentinel_support import KeyedLoad, sentinel_env, sentinel_settings
from tests.support import ADMIN_TOKEN

CHAOS_CYCLES = int(os.environ.get("FAILOVER_CYCLES", "10"))
HOT_STOCK = 40
CLIENTS = 6
WARM_S = 1.5


async def _create_sale(base: str, stock: int) -> str:
    async with ClientSession() as s, s.post(
        f"{base}/api/v1/sales", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        json={"sku": "SKU-F", "name": "failover", "price_cents": 500, "stock": stock,
              "per_user_limit": 1000, "hold_seconds": 600},
    ) as r:
        body: Any = await r.json()
        assert r.status == 201, body
        return str(body["sale_id"])


async def _first_accept_after(load: KeyedLoad, t: float, timeout_s: float = 60.0) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = load.first_accept_after(t)
        if got is not None:
            return got
        await asyncio.sleep(0.02)
    raise AssertionError(f"no reservation accepted within {timeout_s}s of the fault")


async def _scenario(
    settings: Settings, services: Services, figures: Figures, tmp_path: Path, *,
    acks: int, cycles: int, fault: str,
) -> Verdict:
    topo = SentinelTopology(tmp_path / "topology")
    await asyncio.to_thread(topo.start)
    try:
        assert settings.database_url
        s = sentinel_settings(topo, settings.database_url, consumer_claim_idle_ms=300,
                              redis_replica_acks=acks)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = flashsale_env(replace(s, redis_url="redis://set-by-sentinels"), tmp_path,
                            FLASHSALE_PORT=str(port), **sentinel_env(topo, acks))
        for name in ("serve", "consume", "compensate"):
            services.add(name, env, name=name).start()
        await wait_http(f"{base}/readyz", timeout_s=30)
        big = await _create_sale(base, 1_000_000)
        hot = await _create_sale(base, HOT_STOCK)
        load = KeyedLoad(base, [big, hot], clients=CLIENTS)
        stop, grace = asyncio.Event(), asyncio.Event()
        running = asyncio.create_task(load.run(stop, grace))
        per_cycle: list[dict[str, float]] = []
        try:
            for _ in range(cycles):
                await asyncio.sleep(WARM_S)
                old = topo.primary()
                t0 = time.monotonic()
                if fault == "kill":
                    old.kill9()
                    _new, failover_s = await asyncio.to_thread(topo.wait_failover, old.port)
                    await asyncio.to_thread(topo.restart_as_replica, old)
                else:  # pause past the failover, then let it run again
                    old.pause()
                    _new, failover_s = await asyncio.to_thread(topo.wait_failover, old.port)
                    await asyncio.sleep(1.0)
                    old.resume()
                    await asyncio.to_thread(topo.wait_sentinels_ready)
                    await asyncio.to_thread(
                        topo.wait_replicas_synced, topo.primary().port, 1)
                unavailable_s = await _first_accept_after(load, t0)
                per_cycle.append({"failover_s": round(failover_s, 2),
                                  "no_reservation_s": round(unavailable_s, 2)})
            await asyncio.sleep(WARM_S)
        finally:
            stop.set()
            try:
                await asyncio.wait_for(asyncio.shield(running), 30)
            except TimeoutError:
                grace.set()
                await running
        async with open_backends(s) as b:
            verdict = await load.history.check(HttpReader(b, base, ADMIN_TOKEN),
                                               sales=[big, hot])
        hot_sale = next(v for v in verdict.sales if v.sale_id == hot)
        figures.update(
            fault=fault, replica_acks=acks, cycles=cycles, keys=load.keys,
            statuses=dict(load.statuses), undecided=load.undecided,
            resolved_after_503=load.resolved_after_503,
            hot_stock=HOT_STOCK, hot_held=hot_sale.held, per_cycle=per_cycle,
            **verdict.figures(),
        )
        print(f"\nfailover {fault} acks={acks}: {dict(figures)}")
        assert load.undecided == 0, "a key was never decided"
        assert hot_sale.held <= HOT_STOCK
        return verdict
    finally:
        topo.stop()


async def test_failover_kill9_short(
    chaos_settings: Settings, services: Services, figures: Figures, tmp_path: Path
) -> None:
    """The normal suite's variant: 2 kill -9 cycles, acks on."""
    verdict = await _scenario(chaos_settings, services, figures, tmp_path,
                              acks=1, cycles=2, fault="kill")
    verdict.assert_valid()


@pytest.mark.chaos
@pytest.mark.parametrize("acks", [1, 0])
async def test_failover_kill9(
    chaos_settings: Settings, services: Services, figures: Figures, tmp_path: Path, acks: int
) -> None:
    verdict = await _scenario(chaos_settings, services, figures, tmp_path,
                              acks=acks, cycles=CHAOS_CYCLES, fault="kill")
    if acks:
        verdict.assert_valid()
    else:  # measured: what the acknowledgement buys
        assert verdict.duplicated == 0


@pytest.mark.chaos
@pytest.mark.parametrize("acks", [1, 0])
async def test_failover_pause(
    chaos_settings: Settings, services: Services, figures: Figures, tmp_path: Path, acks: int
) -> None:
    verdict = await _scenario(chaos_settings, services, figures, tmp_path,
                              acks=acks, cycles=max(2, CHAOS_CYCLES // 3), fault="pause")
    if acks:
        verdict.assert_valid()
    else:
        assert verdict.duplicated == 0
