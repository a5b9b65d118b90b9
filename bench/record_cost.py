"""Redis CPU per accepted order: reserve_batch fed directly, then the consumer's
read (XREADGROUP) and ack (ack_persisted), on a redis-server of its own.

    PYTHONPATH=<checkout> python bench/record_cost.py [--orders 40000] [--batch 64] [--runs 3]

The scripts come from the ``flashsale`` package on PYTHONPATH (point it at
another checkout to measure its scripts). Figures are Redis's own accounting,
per accepted order: ``INFO commandstats`` microseconds of each command (the
script, the read, the ack) and ``INFO cpu`` (user + sys of the whole server,
which includes the event loop and the replies). No HTTP, no PostgreSQL.
Median of ``--runs`` runs; keyless and keyed (an idempotency record each)
separately.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import tempfile
import time
from typing import Any

from redis.asyncio import Redis

from flashsale.core.keys import SaleKeys
from flashsale.core.scripts import Scripts

GROUP = "persist"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _stats(r: Redis) -> dict[str, float]:
    cmd: Any = await r.info("commandstats")
    cpu: Any = await r.info("cpu")
    out = {name.removeprefix("cmdstat_"): float(v["usec"]) for name, v in cmd.items()}
    out["server_cpu_us"] = (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])) * 1e6
    return out


def _delta(a: dict[str, float], b: dict[str, float], key: str) -> float:
    return b.get(key, 0.0) - a.get(key, 0.0)


async def _run(r: Redis, scripts: Scripts, orders: int, batch: int, keyed: bool,
               tag: str) -> dict[str, float]:
    sale_id = f"sl_cost{tag}"
    k = SaleKeys("bench", sale_id)
    await r.flushdb()
    await scripts.load_sale(keys=[k.sale, k.stream, k.restocks],
                            args=[orders, 10, 100, 0, 0, 600_000, GROUP], client=r)
    now_ms = int(time.time() * 1000)
    s0 = await _stats(r)
    accepted = 0
    for start in range(0, orders, batch):
        keys: list[Any] = [k.sale, k.users, k.holds, k.pending, k.stream, k.void,
                           k.room_used, k.room_admitted]
        args: list[Any] = [now_ms, 600, min(batch, orders - start)]
        for i in range(start, min(start + batch, orders)):
            user = f"user-{i:08d}"
            idem = f"key-{i:08d}" if keyed else ""
            keys.append(k.idempotency(user, idem) if keyed else k.sale)
            args.append("\x1f".join((f"{sale_id}-{now_ms:011x}{i:010x}", user, "1",
                                     "1" if keyed else "0", f"{sale_id}|1", idem)))
        res = await scripts.reserve_batch(keys=keys, args=args, client=r)
        accepted += sum(1 for c in res[0::2] if int(c) == 0)
    s1 = await _stats(r)
    mem: Any = await r.info("memory")
    read = 0
    while True:
        got: Any = await r.xreadgroup(GROUP, "c1", {k.stream: ">"}, count=batch)
        if not got:
            break
        items = got[0][1]
        read += len(items)
        ack: list[Any] = [GROUP]
        for eid, f in items:
            oid = f[b"o"]
            ack += [eid, oid, 1]
        await scripts.ack_persisted(keys=[k.sale, k.pending, k.stream], args=ack, client=r)
    s2 = await _stats(r)
    assert accepted == orders == read, (accepted, orders, read)
    await r.flushdb()
    per = float(accepted)
    return {
        "reserve_script_us": _delta(s0, s1, "evalsha") / per,
        "reserve_server_cpu_us": _delta(s0, s1, "server_cpu_us") / per,
        "read_us": _delta(s1, s2, "xreadgroup") / per,
        "ack_script_us": _delta(s1, s2, "evalsha") / per,
        "drain_server_cpu_us": _delta(s1, s2, "server_cpu_us") / per,
        "memory_bytes_held": float(mem["used_memory"]) / per,  # after reserving, before the drain
    }


async def _measure(port: int, opts: argparse.Namespace) -> dict[str, dict[str, float]]:
    r = Redis(port=port)
    for _ in range(100):
        try:
            await r.ping()
            break
        except Exception:
            await asyncio.sleep(0.05)
    scripts = Scripts.register(r)
    out: dict[str, dict[str, float]] = {}
    for keyed in (False, True):
        runs = [await _run(r, scripts, opts.orders, opts.batch, keyed, f"{keyed:d}{i}")
                for i in range(opts.runs)]
        out["keyed" if keyed else "keyless"] = {
            name: round(statistics.median(x[name] for x in runs), 2) for name in runs[0]
        }
    await r.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--orders", type=int, default=40_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    opts = ap.parse_args()
    port = _free_port()
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL,
        )
        try:
            out = asyncio.run(_measure(port, opts))
        finally:
            proc.terminate()
            proc.wait(10)
    print(json.dumps({"orders": opts.orders, "batch": opts.batch, **out}, indent=2))


if __name__ == "__main__":
    main()
