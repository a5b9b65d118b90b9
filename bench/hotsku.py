"""The hot-SKU ceiling: reservation decisions per second of one Redis core, for one sale.

``reserve_batch`` (the real script, loaded through flashsale.core.scripts) is fed
directly, no HTTP, with batches of the sizes the fronts coalesce under load
(8-128 items), each item with a unique buyer and a unique Idempotency-Key, as the
bench's requests have. Batches are built before the clock starts and several
calls are kept in flight, so Redis, not the client, is the busy side; the figure
is decisions / Redis CPU seconds from ``INFO cpu`` (the main thread, which runs
every script: one core is the limit of one sale on one shard; the whole process,
AOF's background fsync included, is shown beside it). Accepted (stock never runs
out) and sold-out (available 0: the keyed refusal is still remembered) are
measured apart, on an embedded Redis of the bench's own (nothing else runs on
it), with AOF everysec (the service's setting) and without AOF.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from flashsale.core.keys import SaleKeys
from flashsale.core.scripts import Scripts
from flashsale.run.embedded.servers import EmbeddedServers

BATCH_SIZES = (8, 32, 128)
IN_FLIGHT = 4
HOLD_MS = 3_600_000
IDEM_TTL_S = 3600


@dataclass
class HotRun:
    aof: str
    outcome: str  # "accepted" or "sold_out"
    batch: int
    decisions: int
    wall_s: float
    redis_main_cpu_s: float
    redis_cpu_s: float
    codes: dict[str, int] = field(default_factory=dict)

    @property
    def per_core(self) -> float:
        """Decisions per second of Redis main-thread CPU: one core's ceiling."""
        return self.decisions / self.redis_main_cpu_s if self.redis_main_cpu_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["decisions_per_core_s"] = round(self.per_core)
        d["decisions_per_process_cpu_s"] = (
            round(self.decisions / self.redis_cpu_s) if self.redis_cpu_s else None)
        d["redis_main_us_per_decision"] = (
            round(self.redis_main_cpu_s / self.decisions * 1e6, 2) if self.decisions else None)
        d["wall_decisions_per_s"] = round(self.decisions / self.wall_s) if self.wall_s else None
        return d


@dataclass
class HotSkuResult:
    runs: list[HotRun] = field(default_factory=list)
    error: str | None = None

    def best(self, outcome: str, aof: str = "everysec") -> float | None:
        """The ceiling: the best batch size's decisions per core-second."""
        v = [r.per_core for r in self.runs if r.outcome == outcome and r.aof == aof]
        return round(max(v)) if v else None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for aof in ("everysec", "no"):
            for outcome in ("accepted", "sold_out"):
                out[f"{outcome}_aof_{aof}"] = self.best(outcome, aof)
        out["accepted"] = self.best("accepted")
        out["sold_out"] = self.best("sold_out")
        out["by_batch"] = [r.as_dict() for r in self.runs]
        return out


async def _cpu(r: Redis) -> tuple[float, float]:
    info: dict[str, Any] = await r.info("cpu")
    main = float(info.get("used_cpu_user_main_thread", info["used_cpu_user"])) + float(
        info.get("used_cpu_sys_main_thread", info["used_cpu_sys"]))
    return main, float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _one(r: Redis, scripts: Scripts, aof: str, outcome: str, batch: int,
               decisions: int) -> HotRun:
    sale_id = "sl_hot" + secrets.token_hex(4)
    k = SaleKeys("hot" + secrets.token_hex(3), sale_id)
    now_ms = int(time.time() * 1000)
    available = 0 if outcome == "sold_out" else decisions * 2
    await r.hset(k.sale, mapping={
        "stock": available, "available": available, "pending": 0, "limit": 1,
        "price": 1999, "starts_ms": now_ms - 1000, "ends_ms": 0, "hold_ms": HOLD_MS,
    })
    fp = f"{sale_id}|1".encode()
    calls: list[tuple[list[Any], list[Any]]] = []
    n = 0
    while n < decisions:
        keys: list[Any] = [k.sale, k.users, k.holds, k.pending, k.stream, k.void,
                           k.room_used, k.room_admitted]
        args: list[Any] = [now_ms, IDEM_TTL_S, batch]
        for _ in range(batch):
            user, key = f"u{n:07d}", f"hot-{n}"
            order_id = f"{sale_id}-{now_ms:011x}{n:010x}"
            keys.append(k.idempotency(user, key).encode())
            args.append(b"\x1f".join((order_id.encode(), user.encode(), b"1", b"1", fp,
                                      key.encode())))
            n += 1
        calls.append((keys, args))
    codes: dict[str, int] = {}
    queue = list(reversed(calls))

    async def worker() -> None:
        while queue:
            keys, args = queue.pop()
            res = await scripts.reserve_batch(keys=keys, args=args)
            for code in res[0::2]:
                codes[str(int(code))] = codes.get(str(int(code)), 0) + 1

    await scripts.reserve_batch(keys=calls[0][0][:8], args=[now_ms, IDEM_TTL_S, 0])
    main0, all0 = await _cpu(r)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    wall = time.perf_counter() - t0
    main1, all1 = await _cpu(r)
    return HotRun(aof, outcome, batch, n, round(wall, 3), round(main1 - main0, 4),
                  round(all1 - all0, 4), codes)


def _reachable(workdir: Path, data: Path) -> None:
    """The data directory, searchable by the user the embedded servers may run as."""
    data.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    data.chmod(0o755)


async def measure_hot_sku(workdir: Path, decisions: int, quick: bool) -> HotSkuResult:
    """Every (AOF, outcome, batch size) on embedded Redis servers of its own."""
    result = HotSkuResult()
    try:
        for aof in ("everysec", "no"):
            data = workdir / f"hot-redis-{aof}"
            await asyncio.to_thread(_reachable, workdir, data)
            extra = ("--appendonly", "no") if aof == "no" else ()
            emb = EmbeddedServers(data, redis=True, postgres=False, redis_args=extra)
            await asyncio.to_thread(emb.start)
            try:
                r = Redis.from_url(emb.redis_url or "")
                try:
                    scripts = Scripts.register(r)
                    for outcome in ("accepted", "sold_out"):
                        for batch in (BATCH_SIZES[-1:] if quick else BATCH_SIZES):
                            run = await _one(r, scripts, aof, outcome, batch, decisions)
                            result.runs.append(run)
                            print(f"  hot SKU aof={aof:<8} {outcome:<8} batch {batch:>3}: "
                                  f"{run.per_core:>9,.0f} decisions/s per Redis core "
                                  f"({run.decisions:,} in {run.wall_s:.2f} s, codes "
                                  f"{run.codes})", flush=True)
                finally:
                    await r.aclose()
            finally:
                await asyncio.to_thread(emb.stop)
    except Exception as exc:  # an extra figure: never lose the others
        result.error = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"  hot SKU: FAILED: {result.error}", flush=True)
    return result
