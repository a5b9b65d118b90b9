"""`make bench`: echo ceiling, naive PostgreSQL, flashsale reserve / sold-out / drain.

One run on this machine, one load generator (wrk, see bench/wrk/reserve.lua)
and one request shape for every system: POST .../orders on a single hot
sale by random buyers (pre-minted JWTs), 64 connections, a warm-up that is
discarded, then N measured runs per system (medians with min–max), each
checked for correctness. Writes bench/results/latest.{md,json,png}.

Servers: FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL when set, else embedded
ones in a temporary directory. Always a fresh database and a unique Redis key
prefix; both are removed at the end.

    python -m bench.run              # the full bench (several minutes, CPU-heavy)
    python -m bench.run --quick      # seconds: a smoke run, figures mean nothing
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import uvloop
from redis.asyncio import Redis

from bench import loadgen, procs, replicated, report
from bench import room as bench_room
from bench.drain import DrainResult, measure_drain
from bench.history import measure_history
from bench.hotsku import measure_hot_sku
from bench.lab import Lab, Options
from bench.latency import measure_open_loop
from bench.measure import SystemResult, measure
from bench.replicated import OwnRedisTarget, ReplicatedTarget
from bench.targets import EchoTarget, FlashsaleTarget, NaivePgTarget
from flashsale import auth
from flashsale.core import migrate

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEMS = ("echo", "naive_pg", "reserve", "soldout", "replica", "drain", "openloop", "hotsku",
           "history", "room")
TOKEN_TTL_S = 6 * 3600


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny durations, 1 run, 1 worker, small pool")
    p.add_argument("--runs", type=int, help="measured runs per system (default 3)")
    p.add_argument("--duration", type=float, help="seconds per measured run (default 8)")
    p.add_argument("--warmup", type=float, help="first warm-up seconds (default 6; 0 = none)")
    p.add_argument("--warmup-max", type=float, default=90.0,
                   help="warm-up goes on in 4 s chunks until the rate is stable and every "
                        "worker's token cache is warm, up to this (default 90)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--users", type=int, help="buyer pool size (default 50000)")
    p.add_argument("--drain-orders", type=int, help="backlog of the drain test (default 100000)")
    p.add_argument("--workers", default=None, help="flashsale/echo front processes (default 1,2)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                   help="auto: wrk; the built-in Python client only with --quick when wrk is "
                        "missing")
    p.add_argument("--pg-pool", type=int, default=16, help="naive baseline's asyncpg pool")
    p.add_argument("--profile", action="store_true",
                   help="after the measured runs, one extra run of each flashsale system "
                        "under py-spy (summary in the output dir)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    return p


def options(argv: list[str] | None) -> Options:
    a = _parser().parse_args(argv)
    quick = bool(a.quick)
    loadgen_kind = a.loadgen
    if loadgen_kind == "auto":
        loadgen_kind = "wrk" if loadgen.have_wrk() else ("python" if quick else "missing")
    if loadgen_kind == "missing" or (loadgen_kind == "wrk" and not loadgen.have_wrk()):
        raise SystemExit(
            "bench: wrk is not installed (run `bash bench/ensure-wrk.sh`, or "
            "apt-get install wrk); only --quick may fall back to the Python client"
        )
    workers = a.workers or ("1" if quick else "1,2")
    systems = tuple(s.strip() for s in a.systems.split(",") if s.strip())
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"bench: unknown system(s) {sorted(unknown)}; choose from {SYSTEMS}")
    return Options(
        quick=quick,
        runs=a.runs or (1 if quick else 3),
        duration_s=a.duration or (1.0 if quick else 8.0),
        warmup_s=a.warmup if a.warmup is not None else (0.0 if quick else 6.0),
        warmup_max_s=a.warmup_max,
        connections=a.connections,
        threads=a.threads,
        users=a.users or (2_000 if quick else 50_000),
        drain_orders=a.drain_orders or (2_000 if quick else 100_000),
        workers=tuple(int(w) for w in workers.split(",")),
        systems=systems,
        loadgen=loadgen_kind,
        profile=bool(a.profile),
        out_dir=a.out.resolve(),
        pg_pool=a.pg_pool,
    )


# ---------------------------------------------------------------------------
# servers, database, buyers
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def servers(
    workdir: Path, *, embedded_redis: bool = False
) -> Iterator[tuple[str, str, dict[str, list[int]]]]:
    """(redis_url, admin DSN, pids of embedded servers) — given URLs or embedded servers
    (``embedded_redis``: a Redis of our own even when FLASHSALE_REDIS_URL is set)."""
    redis_url = None if embedded_redis else os.environ.get("FLASHSALE_REDIS_URL") or None
    database_url = os.environ.get("FLASHSALE_DATABASE_URL") or None
    if redis_url and database_url:
        yield redis_url, database_url, given_server_pids(redis_url, database_url)
        return
    from flashsale.run.embedded.servers import EmbeddedServers

    data = workdir / "servers"
    data.mkdir(parents=True)
    workdir.chmod(0o755)
    data.chmod(0o755)
    emb = EmbeddedServers(data, redis=redis_url is None, postgres=database_url is None)
    emb.start()
    try:
        pids: dict[str, list[int]] = {}
        if emb.redis_pid:
            pids["redis"] = [emb.redis_pid]
        if emb.postgres_pid:
            pids["postgres"] = [emb.postgres_pid]
        yield redis_url or emb.redis_url or "", database_url or emb.database_url or "", pids
    finally:
        emb.stop()


def given_server_pids(redis_url: str, database_url: str) -> dict[str, list[int]]:
    """The pids of given servers when they run on this machine (their CPU is then
    read from /proc like an embedded server's; it includes every other client's)."""
    import redis as redis_sync

    pids: dict[str, list[int]] = {}
    with contextlib.suppress(Exception):
        r = redis_sync.Redis.from_url(redis_url, socket_timeout=2)
        pid = int(r.info("server")["process_id"])
        r.close()
        if Path(f"/proc/{pid}/stat").exists():
            pids["redis"] = [pid]

    async def backend() -> int:
        conn = await asyncpg.connect(database_url, timeout=5)
        try:
            return int(await conn.fetchval("SELECT pg_backend_pid()"))
        finally:
            await conn.close()

    with contextlib.suppress(Exception), ThreadPoolExecutor(1) as pool:  # inside a loop
        pid = pool.submit(asyncio.run, backend()).result(timeout=10)
        fields = procs.stat_fields(pid)
        if fields is not None:  # the backend's parent is the postmaster
            pids["postgres"] = [int(fields[1])]
    return pids


def _with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


@contextlib.asynccontextmanager
async def fresh_database(admin_dsn: str) -> AsyncIterator[str]:
    name = "flashsale_bench_" + secrets.token_hex(4)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = _with_database(admin_dsn, name)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate.migrate(conn)
    finally:
        await conn.close()
    try:
        yield dsn
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def drop_prefix(redis: Redis, prefix: str) -> None:
    batch: list[Any] = []
    async for key in redis.scan_iter(match=f"{prefix}:*", count=5_000):
        batch.append(key)
        if len(batch) >= 5_000:
            await redis.unlink(*batch)
            batch.clear()
    if batch:
        await redis.unlink(*batch)


def mint_tokens(secret: str, users: int, path: Path) -> list[str]:
    tokens = [auth.mint(secret, f"buyer{i:06d}", TOKEN_TTL_S) for i in range(users)]
    path.write_text("\n".join(tokens) + "\n")
    return tokens


async def pg_settings(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        version = await conn.fetchval("SHOW server_version")
        fsync = await conn.fetchval("SHOW fsync")
        sync = await conn.fetchval("SHOW synchronous_commit")
    finally:
        await conn.close()
    return f"PostgreSQL {version} (fsync={fsync}, synchronous_commit={sync})"


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores {model}, Python {platform.python_version()}"


def wrk_version() -> str:
    wrk = shutil.which("wrk")
    if not wrk:
        return ""
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    words = (out.stdout or out.stderr or "wrk").split()
    return " ".join(words[:2])


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


async def _systems(lab: Lab) -> tuple[list[SystemResult], DrainResult | None]:
    opts = lab.opts
    results: list[SystemResult] = []
    w_label = {1: "1 worker", 2: "2 workers"}

    def label(base: str, n: int) -> str:
        return f"{base} ({w_label.get(n, f'{n} workers')})"

    plan: list[tuple[str, Any, bool]] = []
    if "echo" in opts.systems:
        for n in opts.workers:
            plan.append(("echo", EchoTarget(lab, f"echo_w{n}", label("echo ceiling", n), n), False))
    if "naive_pg" in opts.systems:
        plan.append(("naive_pg", NaivePgTarget(lab, "naive_pg", "naive PostgreSQL (1 worker)"),
                     False))
    if "reserve" in opts.systems:
        for n in opts.workers:
            t = FlashsaleTarget(lab, f"reserve_w{n}", label("flashsale reserve", n), n)
            plan.append(("reserve", t, False))
    if "soldout" in opts.systems:
        for n in opts.workers:
            t = FlashsaleTarget(lab, f"soldout_w{n}", label("flashsale sold-out", n), n)
            plan.append(("soldout", t, True))
    if "replica" in opts.systems:  # the price of one replica acknowledging (bench/replicated.py)
        for n in opts.workers[:1]:
            # kind "replica": the reserve workload, kept out of the figures that pick
            # the best "reserve" system (headline, open loop, CPU per order, history)
            plan.append(("replica", OwnRedisTarget(
                lab, replicated.OWN_KEY.format(n=n),
                label("flashsale reserve, own Redis, no replica", n), n), False))
            plan.append(("replica", ReplicatedTarget(
                lab, replicated.REPLICATED_KEY.format(n=n),
                label("flashsale reserve, own Redis, 1 replica acknowledging", n), n), False))
    for kind, target, sold_out in plan:
        print(f"== {target.label}", flush=True)
        results.append(await measure(lab, target, kind, sold_out=sold_out))
    drain = None
    if "drain" in opts.systems:
        print(f"== consumer drain (backlog {opts.drain_orders:,})", flush=True)
        drain = await measure_drain(lab)
    return results, drain


async def _extras(lab: Lab, admin_dsn: str, results: list[SystemResult]) -> report.Extras:
    """Issue 14's measurements, after the closed-loop systems (they need the capacity)."""
    opts = lab.opts
    extras = report.Extras()
    if "openloop" in opts.systems:
        best = max((r for r in results if r.kind == "reserve" and r.runs),
                   key=lambda r: r.stat("rps")[0], default=None)
        if best is not None:
            capacity, source, workers = best.stat("rps")[0], best.label, best.workers
        else:  # no closed-loop reserve run this time: a fixed small rate
            capacity, source, workers = 400.0, "fixed (reserve not measured)", opts.workers[0]
        print(f"== open loop at {', '.join(f'{x:.0%}' for x in (0.25, 0.5, 0.8))} of "
              f"{capacity:,.0f} req/s", flush=True)
        extras.open_loop = await measure_open_loop(lab, capacity, source, workers)
    if "hotsku" in opts.systems:
        print("== hot-SKU ceiling (reserve_batch fed directly)", flush=True)
        extras.hot_sku = await measure_hot_sku(
            lab.workdir, 2_000 if opts.quick else 40_000, opts.quick)
    if "history" in opts.systems:
        print("== cost of history", flush=True)
        extras.history = await measure_history(lab, lambda: fresh_database(admin_dsn))
    return extras


async def bench(opts: Options) -> int:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="flashsale-bench-"))
    try:
        with servers(workdir) as (redis_url, admin_dsn, server_pids):
            async with fresh_database(admin_dsn) as dsn:
                return await _run(opts, workdir, redis_url, dsn, server_pids, started,
                                  admin_dsn)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.asynccontextmanager
async def open_lab(opts: Options, workdir: Path, redis_url: str, dsn: str,
                   server_pids: dict[str, list[int]], prefix_tag: str) -> AsyncIterator[Lab]:
    """A run's Lab (bench and soak): fresh secrets, pre-minted buyers, a key prefix
    of its own, a Redis client and an HTTP session. At the end the prefix's keys
    are removed and the clients closed."""
    jwt_secret = secrets.token_urlsafe(32)
    tokens_file = workdir / "tokens.txt"
    tokens = await asyncio.to_thread(mint_tokens, jwt_secret, opts.users, tokens_file)
    prefix = prefix_tag + secrets.token_hex(4)
    redis = Redis.from_url(redis_url)
    try:
        async with aiohttp.ClientSession() as http:
            yield Lab(
                opts=opts, workdir=workdir, redis_url=redis_url, dsn=dsn,
                server_pids=server_pids, prefix=prefix, jwt_secret=jwt_secret,
                admin_token=secrets.token_urlsafe(24), webhook_secret=secrets.token_urlsafe(24),
                tokens=tokens, tokens_file=tokens_file, http=http, redis=redis,
            )
    finally:
        with contextlib.suppress(Exception):
            await drop_prefix(redis, prefix)
        await redis.aclose()


async def _run(opts: Options, workdir: Path, redis_url: str, dsn: str,
               server_pids: dict[str, list[int]], started: str, admin_dsn: str) -> int:
    async with open_lab(opts, workdir, redis_url, dsn, server_pids, "bench") as lab:
        print(f"bench: {len(opts.systems)} system group(s), {opts.runs} run(s) × "
              f"{opts.duration_s:g} s, load generator {opts.loadgen}, servers "
              f"{'embedded' if server_pids else 'given'}", flush=True)
        results, drain = await _systems(lab)
        extras = await _extras(lab, admin_dsn, results)
        room_js = None
        if "room" in opts.systems:  # the waiting room's costs: room.md, room.json
            print("== waiting room (polls/s vs echo, joins/s, bytes per ticket)", flush=True)
            room_md, room_js = bench_room.write(await bench_room.measure_room(lab),
                                                opts.out_dir)
            print(room_md.read_text())
        meta: dict[str, Any] = {
            "started": started, "machine": machine(), "cores": os.cpu_count(),
            "loadgen": opts.loadgen if opts.loadgen != "wrk" else wrk_version(),
            "threads": opts.threads, "connections": opts.connections, "runs": opts.runs,
            "duration_s": opts.duration_s, "users": opts.users, "quick": opts.quick,
            "warmup": (f"{opts.warmup_s:g} s, then 4 s chunks until the rate is within 5 % "
                       "and each worker's JWT cache holds ~95 % of the buyers, at most "
                       f"{opts.warmup_max_s:g} s") if opts.warmup_s > 0 else "none",
            "postgres": await pg_settings(dsn), "servers": "embedded" if server_pids
            else "given", "drain_orders": opts.drain_orders,
            "server_cpu": "embedded servers' own processes" if server_pids.get("postgres")
            and not os.environ.get("FLASHSALE_DATABASE_URL") else
            "given servers' processes: their CPU includes every other client of them",
            "openloop": "bench/openloop/openloop.c (C, epoll, constant arrival rate, "
            "latency from the due time)",
        }
        replica_cost = replicated.ratio(results, opts.workers[0]) if opts.workers else None
        if replica_cost is not None:  # the price of "acknowledged means replicated"
            meta["replica_ack_cost"] = replica_cost
        md, js, png = report.write(results, drain, meta, opts.out_dir, extras)
        if replica_cost is not None:
            md.write_text(md.read_text() + replicated.markdown(replica_cost))
        if room_js is not None:  # this run's room figures only, never an older room.json
            bench_room.add_section(md, room_js)
    print()
    print(md.read_text())
    print(f"wrote {md}, {js}, {png}")
    failed = [r.label for r in results if not r.ok] + (
        ["consumer drain"] if drain and not drain.ok else [])  # incorrect, or an error
    if extras.open_loop is not None and not extras.open_loop.ok:
        failed.append("open loop")
    if extras.history is not None and not extras.history.ok:
        failed.append("history")
    if extras.hot_sku is not None and extras.hot_sku.error:
        failed.append("hot SKU")
    if failed:
        print(f"bench: CORRECTNESS FAILED for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    opts = options(argv)
    return uvloop.run(bench(opts))


if __name__ == "__main__":
    sys.exit(main())
