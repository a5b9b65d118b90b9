"""The reserve path with one replica acknowledging each batch, against the
same without: two flashsale systems on Redis servers of their own, in the same
run, so their ratio is the price of "acknowledged means replicated"
(FLASHSALE_REDIS_REPLICA_ACKS=1: one WAIT per reservation batch, replication.py).

* ``reserve_own``: one redis-server of its own, no replica, acks 0;
* ``reserve_replicated``: a primary and one replica (min-replicas-to-write 1),
  acks 1 (the Sentinel default), timeout 500 ms.

Both use flashsale/run/embedded/sentinel.py's node arguments (no persistence),
so the only difference is the replica and the WAIT.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.measure import SystemResult
from bench.targets import FlashsaleTarget
from flashsale.run.embedded.sentinel import SentinelTopology


class OwnRedisTarget(FlashsaleTarget):
    """FlashsaleTarget on a Redis of its own, with ``replicas`` replica(s) and
    FLASHSALE_REDIS_REPLICA_ACKS = ``replicas``."""

    replicas = 0
    topo: SentinelTopology
    own_url: str
    own_redis: Redis

    async def start(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix=f"bench-{self.key}-")
        self.topo = SentinelTopology(
            Path(self._dir.name), replicas=self.replicas, sentinels=0,
            min_replicas_to_write=self.replicas,
        )
        await asyncio.to_thread(self.topo.start_data)
        self.own_url = f"redis://127.0.0.1:{self.topo.data[0].port}/0"
        self.own_redis = Redis.from_url(self.own_url)
        await super().start()

    def service_env(self) -> dict[str, str]:
        env = super().service_env()
        env.update(FLASHSALE_REDIS_URL=self.own_url,
                   FLASHSALE_REDIS_REPLICA_ACKS=str(self.replicas))
        return env

    async def wait_drained(self, sale_id: str) -> None:
        lab_redis = self.lab.redis
        self.lab.redis = self.own_redis  # the stream lives in our own Redis
        try:
            await super().wait_drained(sale_id)
        finally:
            self.lab.redis = lab_redis

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            await self.own_redis.aclose()
            self.topo.stop()
            self._dir.cleanup()


class ReplicatedTarget(OwnRedisTarget):
    replicas = 1


OWN_KEY = "reserve_own_w{n}"
REPLICATED_KEY = "reserve_replicated_w{n}"


def ratio(results: Sequence[SystemResult], workers: int) -> dict[str, Any] | None:
    """The price of one replica acknowledging, from the same run: throughput and
    p99 of ``reserve_replicated`` over ``reserve_own`` (None when either is
    missing or measured nothing)."""
    by_key = {r.key: r for r in results}
    own = by_key.get(OWN_KEY.format(n=workers))
    rep = by_key.get(REPLICATED_KEY.format(n=workers))
    if own is None or rep is None or not own.stat("rps")[0] or not own.stat("p99_ms")[0]:
        return None
    return {
        "workers": workers,
        "rps_no_replica": round(own.stat("rps")[0], 1),
        "rps_one_replica_acking": round(rep.stat("rps")[0], 1),
        "throughput_ratio": round(rep.stat("rps")[0] / own.stat("rps")[0], 3),
        "p99_ms_no_replica": round(own.stat("p99_ms")[0], 2),
        "p99_ms_one_replica_acking": round(rep.stat("p99_ms")[0], 2),
        "p99_ratio": round(rep.stat("p99_ms")[0] / own.stat("p99_ms")[0], 3),
    }


def markdown(cost: dict[str, Any]) -> str:
    """The section bench/results/latest.md gets (run.py appends it)."""
    return (
        "\n## Reserve with one replica acknowledging vs none (same run)\n\n"
        "Each on a Redis of its own (bench/replicated.py): one WAIT per reservation "
        "batch (FLASHSALE_REDIS_REPLICA_ACKS=1) against none.\n\n"
        "| | no replica | 1 replica acknowledging | ratio |\n|---|---:|---:|---:|\n"
        f"| throughput (req/s, {cost['workers']} worker(s)) | {cost['rps_no_replica']:,} | "
        f"{cost['rps_one_replica_acking']:,} | x{cost['throughput_ratio']:.2f} |\n"
        f"| p99 (ms) | {cost['p99_ms_no_replica']} | {cost['p99_ms_one_replica_acking']} | "
        f"x{cost['p99_ratio']:.2f} |\n"
    )
