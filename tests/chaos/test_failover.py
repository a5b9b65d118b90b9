"""Redis failover under load, Jepsen-style: kill -9, SIGSTOP, or kill -9 while
the replicas lag, of the primary of a real Sentinel topology while buyers
reserve, and check every answer.

Topology (flashsale/run/embedded/sentinel.py, per test): a primary, two
replicas (FAILOVER_REPLICAS), three sentinels (down-after 1000 ms,
failover-timeout 3000 ms), every data node with min-replicas-to-write 1.
Three flashsale children, ``serve``, ``consume`` and ``compensate``, find the
primary through the sentinels (FLASHSALE_REDIS_SENTINELS) and are never
restarted.

Load: several buyers in parallel, unique Idempotency-Keys, one request at a
time each, a 503 / transport error retried with the same key until decided;
two sales: one with stock to spare, one oversubscribed several times.

Faults, one per cycle, each on the current primary (the sentinels must agree
and see every replica first):
* ``kill``: kill -9; the old node comes back, empty, as a replica;
* ``pause``: SIGSTOP past the failover, then SIGCONT: it wakes up as a
  primary holding its clients' requests and must accept nothing that is lost
  (the sentinels demote it ~8 s after it wakes);
* ``lag``: every replica's replication link goes through a TcpProxy that
  holds back what the primary sends (their acknowledgements still reach it),
  the consumer is stopped (a backlog), and the primary is killed 1.5 s later.

Afterwards (load stopped, every key decided, queues drained)
tests/chaos/history.py checks every operation: lost 0, duplicated 0,
unexpected 0 (every 503 reserved nothing or its retry accounts for it),
accepted <= stock, ledger consistent. Each cycle prints a timeline of what the
buyers heard, per half second. Per cycle, three durations from the fault:
``no_primary_s``, seconds without a primary (until a replica says it is the
master: the sentinels promoted it), ``failover_s``, until the sentinels all
agree on it (they learn it from each other: later), and ``no_reservation_s``,
until the first 202 of a request sent after the fault (clients follow the
first sentinel that names the new primary: between the two); and
``other_masters_at_fault``, the other nodes that said they were a master
when the fault struck (should be 0: a woken old primary not demoted yet).

With FLASHSALE_REDIS_REPLICA_ACKS=1 (the Sentinel default) all of it must
hold. With 0 the same runs measure what the acknowledgement buys: under
``lag`` the 202s of the lag are lost (asserted > 0: the fault is real).

Chaos (``make chaos``): FAILOVER_CYCLES cycles (default 10). The normal suite
runs 2 kill cycles with acks on (test_failover_kill9_short).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from redis.exceptions import RedisError

from flashsale.config import Settings
from flashsale.core.backends import open_backends
from flashsale.run.embedded.nodes import LOOPBACK, TopologyError, command, info
from flashsale.run.embedded.sentinel import SentinelTopology
from flashsale.run.embedded.servers import free_port
from tests.chaos.conftest import Figures
from tests.chaos.faultkit import wait_http
from tests.chaos.faults import TcpProxy
from tests.chaos.harness import Services, flashsale_env
from tests.chaos.history import HttpReader, Verdict
from tests.sentinel_support import KeyedLoad, sentinel_env, sentinel_settings
from tests.support import ADMIN_TOKEN

CHAOS_CYCLES = int(os.environ.get("FAILOVER_CYCLES", "10"))
HOT_STOCK = 40
CLIENTS = 6
WARM_S = 1.5
# Two replicas, as in production: after a failover the other replica follows
# the new primary at once, so "one replica acknowledges" holds again without
# waiting for the failed node (with one replica, the new primary refuses
# writes -- min-replicas-to-write 1 -- until the old one is back as a replica:
# a paused primary is demoted by the sentinels only ~8 s after it wakes).
REPLICAS = int(os.environ.get("FAILOVER_REPLICAS", "2"))
LAG_S = 1.5  # how long the replica lags (and the consumer is stopped) before the kill
LAG_CYCLES = 2
CHECK_TRIES = 3
LAG_HOLD_MS = 120_000  # the proxy holds back the primary's stream that long: never delivered


async def _create_sale(base: str, stock: int) -> str:
    async with ClientSession() as s, s.post(
        f"{base}/api/v1/sales", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        json={"sku": "SKU-F", "name": "failover", "price_cents": 500, "stock": stock,
              "per_user_limit": 1000, "hold_seconds": 600},
    ) as r:
        body: Any = await r.json()
        assert r.status == 201, body
        return str(body["sale_id"])


def _masters(topo: SentinelTopology, old_port: int) -> set[int]:
    """The data nodes other than ``old_port`` that say they are a master (a
    woken old primary does until the sentinels demote it; never a paused one)."""
    out = set()
    for node in topo.data:
        if node.port != old_port and node.alive and not node.paused:
            with contextlib.suppress(TopologyError):
                if info(node.port).get("role") == "master":
                    out.add(node.port)
    return out


def _wait_promoted(
    topo: SentinelTopology, old_port: int, already: set[int], timeout_s: float = 60.0
) -> float:
    """Until a data node that was a replica at the fault (not in ``already``)
    says it is a master, promoted by the sentinels: the monotonic time it was
    first seen so (polled every 20 ms)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _masters(topo, old_port) - already:
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"no replica promoted within {timeout_s}s: {topo.describe()}")


async def _first_accept_after(load: KeyedLoad, t: float, timeout_s: float = 90.0) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = load.first_accept_after(t)
        if got is not None:
            return got
        await asyncio.sleep(0.02)
    raise AssertionError(f"no reservation accepted within {timeout_s}s of the fault")


def _timeline(load: KeyedLoad, t0: float, marks: dict[str, float], until_s: float) -> str:
    """What the buyers heard from ``t0`` on, per half second (requests sent
    after t0), and the marks (fault, promotion, ...): where the time goes."""
    buckets: dict[int, Counter[str]] = defaultdict(Counter)
    for o in list(load.history.ops.values()):
        if o.invoked_at <= t0 or o.completed_at is None or o.completed_at - t0 > until_s:
            continue
        r = o.reply
        what = "transport" if r is None or r.status is None else (
            str(r.status) if r.status == 202 else f"{r.status} {(r.message or '')[:48]}")
        buckets[int((o.completed_at - t0) * 2)][what] += 1
    lines = [" ".join(f"{k}@{v:.2f}s" for k, v in sorted(marks.items(), key=lambda kv: kv[1]))]
    for b in sorted(buckets):
        lines.append(f"  {b / 2:5.1f}s " + "; ".join(f"{n}x {w}" for w, n in
                                                    buckets[b].most_common()))
    return "\n".join(lines)


async def _reroute_through(topo: SentinelTopology, replica_port: int, proxy: TcpProxy) -> None:
    """The replica's replication link through ``proxy`` (a partial resync on
    the same offset): until it is up there and the primary counts it good."""
    primary = topo.primary().port
    await asyncio.to_thread(command, replica_port, "REPLICAOF", LOOPBACK, str(proxy.port))
    deadline = time.monotonic() + 60
    while True:
        rep = await asyncio.to_thread(info, replica_port)
        if rep.get("master_port") == str(proxy.port) and rep.get("master_link_status") == "up":
            break
        assert time.monotonic() < deadline, f"replica not up through the proxy: {rep}"
        await asyncio.sleep(0.05)
    await asyncio.to_thread(topo.wait_replicas_synced, primary, len(topo.data) - 1, 60)


async def _check(
    topo: SentinelTopology, s: Settings, load: KeyedLoad, base: str, sales: list[str]
) -> Verdict:
    """The history check, on a settled topology: every replica synced (the
    checker drains the streams, and a primary short of good replicas refuses
    those writes -- NOREPLICAS -- for a moment on a loaded machine: then again)."""
    for attempt in range(CHECK_TRIES):
        await asyncio.to_thread(topo.wait_replicas_synced, topo.primary().port,
                                len(topo.data) - 1, 60)
        try:
            async with open_backends(s) as b:
                return await load.history.check(HttpReader(b, base, ADMIN_TOKEN), sales=sales)
        except RedisError as exc:
            if attempt == CHECK_TRIES - 1:
                raise
            print(f"history check: {exc!r}; again ({topo.describe()})", flush=True)
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


async def _scenario(
    settings: Settings, services: Services, figures: Figures, tmp_path: Path, *,
    acks: int, cycles: int, fault: str, replicas: int = REPLICAS,
) -> Verdict:
    """``fault``: "kill" (kill -9 of the primary), "pause" (SIGSTOP past the
    failover, then SIGCONT), or "lag" (the replica's replication link goes
    through a proxy that holds back what the primary sends, the consumer is
    stopped -- a backlog, as under a flash sale's load -- and the primary is
    killed while the replica lags: what was answered 202 then exists only on
    the dead primary unless the acknowledgement waited for the replica)."""
    # the lag fault routes the replica through a proxy: the sentinels must not
    # "fix" its configuration back (they do after failover-timeout)
    topo = SentinelTopology(tmp_path / "topology", replicas=replicas,
                            failover_timeout_ms=60_000 if fault == "lag" else 3000)
    await asyncio.to_thread(topo.start)
    try:
        assert settings.database_url
        s = sentinel_settings(topo, settings.database_url, consumer_claim_idle_ms=300,
                              redis_replica_acks=acks)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = flashsale_env(replace(s, redis_url="redis://set-by-sentinels"), tmp_path,
                            FLASHSALE_PORT=str(port), **sentinel_env(topo, acks))
        children = {name: services.add(name, env, name=name) for name in
                    ("serve", "consume", "compensate")}
        for child in children.values():
            child.start()
        consumer = children["consume"]
        await wait_http(f"{base}/readyz", timeout_s=60)
        big = await _create_sale(base, 1_000_000)
        hot = await _create_sale(base, HOT_STOCK)
        load = KeyedLoad(base, [big, hot], clients=CLIENTS)
        stop, grace = asyncio.Event(), asyncio.Event()
        running = asyncio.create_task(load.run(stop, grace))
        per_cycle: list[dict[str, Any]] = []
        try:
            for _ in range(cycles):
                await asyncio.sleep(WARM_S)
                # never fault a topology that could not fail over yet
                await asyncio.to_thread(topo.wait_sentinels_ready, 60)
                old = topo.primary()
                marks: dict[str, float] = {}
                lagging: list[TcpProxy] = []
                accepted_before = len(load.accepted_at)
                if fault == "lag":  # every replica lags: whichever is promoted lacks the lag
                    async with contextlib.AsyncExitStack() as proxies:
                        for replica in topo.replicas():
                            proxy = await proxies.enter_async_context(TcpProxy(LOOPBACK, old.port))
                            await _reroute_through(topo, replica.port, proxy)
                            lagging.append(proxy)
                        for proxy in lagging:
                            proxy.delay(LAG_HOLD_MS, "down")  # their REPLCONF ACKs still go up
                        os.kill(consumer.pid, signal.SIGSTOP)
                        try:
                            lag_started = time.monotonic()
                            await asyncio.sleep(LAG_S)
                            already = _masters(topo, old.port)
                            t0 = time.monotonic()
                            marks["lag"] = lag_started - t0
                            old.kill9()
                            for proxy in lagging:
                                proxy.cut()  # what it holds back never arrives
                        finally:
                            os.kill(consumer.pid, signal.SIGCONT)
                        accepted_in_lag = len(load.accepted_at) - accepted_before
                        promoted_at = await asyncio.to_thread(
                            _wait_promoted, topo, old.port, already)
                        await asyncio.to_thread(topo.wait_failover, old.port, 60)
                        failover_s = time.monotonic() - t0
                    marks["promoted"] = failover_s
                    await asyncio.to_thread(topo.restart_as_replica, old, 60)
                elif fault == "kill":
                    already = _masters(topo, old.port)
                    t0 = time.monotonic()
                    old.kill9()
                    promoted_at = await asyncio.to_thread(_wait_promoted, topo, old.port, already)
                    await asyncio.to_thread(topo.wait_failover, old.port, 60)
                    failover_s = time.monotonic() - t0
                    marks["promoted"] = failover_s
                    await asyncio.to_thread(topo.restart_as_replica, old, 60)
                else:  # pause past the failover, then let it run again
                    already = _masters(topo, old.port)
                    t0 = time.monotonic()
                    old.pause()
                    promoted_at = await asyncio.to_thread(_wait_promoted, topo, old.port, already)
                    await asyncio.to_thread(topo.wait_failover, old.port, 60)
                    failover_s = time.monotonic() - t0
                    marks["promoted"] = failover_s
                    await asyncio.sleep(1.0)
                    old.resume()
                    marks["resumed"] = time.monotonic() - t0
                marks["fault"] = 0.0
                marks["master"] = promoted_at - t0
                unavailable_s = await _first_accept_after(load, t0)
                marks["first_202"] = unavailable_s
                if fault == "pause":
                    await asyncio.to_thread(topo.wait_sentinels_ready, 60)
                    await asyncio.to_thread(topo.wait_replicas_synced, None, 1, 60)
                    marks["sentinels_ready"] = time.monotonic() - t0
                print(f"\n{fault} cycle {len(per_cycle) + 1}: "
                      f"{_timeline(load, t0, marks, unavailable_s + 0.5)}", flush=True)
                cycle: dict[str, Any] = {"other_masters_at_fault": len(already),
                                         "no_primary_s": round(promoted_at - t0, 2),
                                         "failover_s": round(failover_s, 2),
                                         "no_reservation_s": round(unavailable_s, 2)}
                if fault == "lag":
                    cycle["accepted_while_lagging"] = accepted_in_lag
                per_cycle.append(cycle)
            await asyncio.sleep(WARM_S)
        finally:
            stop.set()
            try:
                await asyncio.wait_for(asyncio.shield(running), 60)
            except TimeoutError:
                grace.set()
                await running
        verdict = await _check(topo, s, load, base, [big, hot])
        hot_sale = next(v for v in verdict.sales if v.sale_id == hot)
        figures.update(
            fault=fault, replica_acks=acks, cycles=cycles, keys=load.keys,
            statuses=dict(load.statuses), undecided=load.undecided,
            resolved_after_503=load.resolved_after_503,
            hot_stock=HOT_STOCK, hot_held=hot_sale.held, per_cycle=per_cycle,
            no_primary_s_mean=round(
                sum(c["no_primary_s"] for c in per_cycle) / len(per_cycle), 2),
            no_reservation_s_mean=round(
                sum(c["no_reservation_s"] for c in per_cycle) / len(per_cycle), 2),
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


@pytest.mark.chaos
@pytest.mark.parametrize("acks", [1, 0])
async def test_failover_lagging_replica(
    chaos_settings: Settings, services: Services, figures: Figures, tmp_path: Path, acks: int
) -> None:
    """kill -9 of the primary while its replica lags (its link held back by a
    proxy) and the consumer has a backlog (stopped): with acks on every 202
    is kept (the batches the replica did not acknowledge were released and
    answered 503 "nothing reserved"); with acks off the 202s of the lag are
    lost, and this test says how many."""
    verdict = await _scenario(chaos_settings, services, figures, tmp_path,
                              acks=acks, cycles=LAG_CYCLES, fault="lag")
    if acks:
        verdict.assert_valid()
    else:  # the fault is real: what was answered during the lag is gone
        assert verdict.duplicated == 0
        assert verdict.lost > 0, verdict.figures()
