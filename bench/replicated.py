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
from pathlib import Path

from redis.asyncio import Redis

from bench import procs
from bench.targets import FlashsaleTarget
from flashsale.embedded import free_port
from flashsale.run.embedded.sentinel import SentinelTopology


class OwnRedisTarget(FlashsaleTarget):
    """FlashsaleTarget on a Redis of its own, with ``replicas`` replica(s) and
    FLASHSALE_REDIS_REPLICA_ACKS = ``replicas``."""

    replicas = 0
    topo: SentinelTopology
    own_redis: Redis

    async def start(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix=f"bench-{self.key}-")
        self.topo = SentinelTopology(
            Path(self._dir.name), replicas=self.replicas, sentinels=0,
            min_replicas_to_write=self.replicas,
        )
        await asyncio.to_thread(self.topo.start_data)
        url = f"redis://127.0.0.1:{self.topo.data[0].port}/0"
        self.own_redis = Redis.from_url(url)
        self.sales = []
        self.port = free_port()
        env = self.lab.child_env(
            FLASHSALE_PORT=str(self.port), FLASHSALE_REDIS_URL=url,
            FLASHSALE_REDIS_REPLICA_ACKS=str(self.replicas),
        )
        self.consumer = procs.start(
            f"{self.key}-consumer", procs.python_module("flashsale", "consume"), env,
            self.lab.logs,
        )
        front = procs.start(
            f"{self.key}-front",
            procs.python_module("flashsale", "serve", "--workers", str(self.workers)),
            env, self.lab.logs,
        )
        self.children = [self.consumer, front]
        await self._wait_ready(front)

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
