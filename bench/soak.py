"""`make soak`: memory of flashsale's real service under minutes of steady load.

The issue's requirement: "Report the RSS of a front worker under load and
Redis memory per accepted order once persisted (streams trimmed after ack);
both must stay flat over a 5-minute run."

One front worker (``flashsale serve``), one ``flashsale consume`` and one
``flashsale compensate`` run as children against real servers, on a sale
that never sells out (stock 10^9), with a per-user limit that never binds,
a short hold (unpaid holds expire and the compensator returns their stock)
and a short idempotency TTL (records expire during the run). wrk drives the
bench's request (bench/wrk/reserve.lua, pre-minted buyer JWTs, a unique
Idempotency-Key per request) for the whole run, in consecutive chunks.
Every ``--sample-s`` the RSS of the three processes, Redis used_memory, the
sale's stream length, consumer-group PEL and lag, holds, pending, live
idempotency records and the events stream are sampled.

The verdict: least-squares slopes of the front RSS and of Redis memory over
the second half of the load: used_memory minus the baseline taken before the
sale existed or, on a Redis server shared with others, the run's own keys
(MEMORY USAGE). Then the load stops, the consumer drains (XLEN 0, PEL empty):
Redis bytes per held order; then every hold and idempotency record expires:
the residue per accepted order. Correctness as in the bench: the ledger,
oversell, every 202 persisted. Writes soak.md and soak.json.

    python -m bench.soak                   # 5 minutes of load (CPU-heavy), then ~2 min of expiry
    python -m bench.soak --minutes 0.5     # a short run
    python -m bench.soak --quick           # ~15 s smoke run, figures mean nothing
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import uvloop
from redis.asyncio import Redis

from bench import loadgen, procs
from bench.drain import cpu_cores, lab_settings
from bench.lab import Lab, Options
from bench.loadgen import LoadResult
from bench.run import (
    RESULTS,
    fresh_database,
    machine,
    open_lab,
    pg_settings,
    servers,
    wrk_version,
)
from bench.targets import FlashsaleTarget
from flashsale.core import events, ledger, sales
from flashsale.core.backends import Backends, open_backends
from flashsale.core.keys import SaleKeys
from flashsale.run.embedded.servers import free_port

MB = 2**20
STOCK = sales.STOCK_MAX  # 10^9: never sells out in minutes
PER_USER_LIMIT = sales.LIMIT_MAX  # the largest the API accepts: never binds
FLAT_PCT_PER_MIN = 1.0  # a series is flat when |slope| < this % of its level per minute
DRAIN_TIMEOUT_S = 300.0
LEDGER_RETRY_S = 10.0
COMPENSATOR_STOP_S = 60.0  # it finishes its batch (up to 500 releases) on SIGTERM
IDEM_SAMPLE_KEYS = 100  # idempotency records whose MEMORY USAGE is averaged
REDIS_DBS = 16


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, help="minutes of load (default 5; --quick 0.25)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--sample-s", type=float, help="seconds between samples (default 5; "
                   "--quick 1)")
    p.add_argument("--chunk-s", type=float, default=30.0,
                   help="seconds per wrk run (default 30; at least 4 chunks in a short run)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: ~15 s of load, small buyer pool, 3 s holds, short expiry "
                        "wait")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--users", type=int, help="buyer pool size (default 50000; --quick 2000)")
    p.add_argument("--hold-s", type=int, help="the sale's hold_seconds (default 30; --quick 3)")
    p.add_argument("--idem-ttl-s", type=int, default=60,
                   help="FLASHSALE_IDEMPOTENCY_TTL_S (default 60, the smallest allowed)")
    p.add_argument("--settle-max-s", type=float,
                   help="after the drain, wait at most this long for every hold and "
                        "idempotency record to expire (default idem TTL + hold + 60; --quick 3)")
    p.add_argument("--own-redis", action="store_true",
                   help="start an embedded Redis for the run even when FLASHSALE_REDIS_URL is "
                        "set: used_memory is then the run's alone (a shared server's is not)")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                   help="auto: wrk; the built-in Python client only with --quick when wrk is "
                        "missing")
    p.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    return p


@dataclass(frozen=True)
class SoakOptions:
    quick: bool
    load_s: float
    chunk_s: float
    sample_s: float
    connections: int
    threads: int
    users: int
    hold_s: int
    idem_ttl_s: int
    settle_max_s: float
    loadgen: str
    out_dir: Path
    own_redis: bool = False

    def chunks(self) -> list[float]:
        """wrk runs of whole seconds covering the load; at least 4 when the run allows."""
        size = max(1.0, min(self.chunk_s, self.load_s / 4))
        n = max(1, math.ceil(self.load_s / size - 1e-9))
        return [float(max(1, round(self.load_s / n)))] * n

    def lab_options(self) -> Options:
        return Options(
            quick=self.quick, runs=1, duration_s=self.chunk_s, warmup_s=0.0, warmup_max_s=0.0,
            connections=self.connections, threads=self.threads, users=self.users,
            drain_orders=0, workers=(1,), systems=("soak",), loadgen=self.loadgen,
            profile=False, out_dir=self.out_dir, pg_pool=0,
        )


def options(argv: list[str] | None) -> SoakOptions:
    a = _parser().parse_args(argv)
    quick = bool(a.quick)
    kind = a.loadgen
    if kind == "auto":
        kind = "wrk" if loadgen.have_wrk() else ("python" if quick else "missing")
    if kind == "missing" or (kind == "wrk" and not loadgen.have_wrk()):
        raise SystemExit("soak: wrk is not installed (run `bash bench/ensure-wrk.sh`); only "
                         "--quick may fall back to the Python client")
    minutes = a.minutes if a.minutes is not None else (0.25 if quick else 5.0)
    if minutes <= 0:
        raise SystemExit("soak: --minutes must be positive")
    sample_s = a.sample_s or (1.0 if quick else 5.0)
    hold_s = a.hold_s or (3 if quick else 30)
    if not 1 <= hold_s <= sales.HOLD_MAX_S:
        raise SystemExit(f"soak: --hold-s must be 1..{sales.HOLD_MAX_S}")
    if not 60 <= a.idem_ttl_s <= 30 * 86_400:
        raise SystemExit("soak: --idem-ttl-s must be 60..2592000 (FLASHSALE_IDEMPOTENCY_TTL_S)")
    settle = a.settle_max_s if a.settle_max_s is not None else (
        3.0 if quick else float(a.idem_ttl_s + hold_s + 60))
    return SoakOptions(
        quick=quick, load_s=minutes * 60, chunk_s=a.chunk_s, sample_s=max(0.2, sample_s),
        connections=a.connections, threads=a.threads, users=a.users or (2_000 if quick else 50_000),
        hold_s=hold_s, idem_ttl_s=a.idem_ttl_s, settle_max_s=max(0.0, settle), loadgen=kind,
        out_dir=a.out.resolve(), own_redis=bool(a.own_redis),
    )


# ---------------------------------------------------------------------------
# the service: one front worker, one consumer, one compensator
# ---------------------------------------------------------------------------


@dataclass
class SoakService(FlashsaleTarget):
    """``flashsale serve`` (1 worker), ``flashsale consume`` and ``flashsale compensate``."""

    env_extra: dict[str, str] = field(default_factory=dict)
    compensator: procs.Child | None = None

    async def start(self) -> None:
        self.sales = []
        self.port = free_port()
        env = self.lab.child_env(FLASHSALE_PORT=str(self.port), **self.env_extra)
        logs = self.lab.logs
        self.consumer = procs.start(
            f"{self.key}-consumer", procs.python_module("flashsale", "consume"), env, logs)
        front = procs.start(
            f"{self.key}-front", procs.python_module("flashsale", "serve", "--workers", "1"),
            env, logs)
        self.compensator = procs.start(
            f"{self.key}-compensator", procs.python_module("flashsale", "compensate"), env, logs)
        self.children = [self.consumer, front, self.compensator]  # front is children[1]
        await self._wait_ready(front)

    def named(self) -> dict[str, procs.Child]:
        assert self.consumer is not None and self.compensator is not None
        return {"front": self.front, "consumer": self.consumer, "compensator": self.compensator}

    def cpu_groups(self) -> dict[str, list[int]]:
        return {name: [c.pid] for name, c in self.named().items()}

    def rss(self) -> dict[str, float]:
        return {name: procs.rss_bytes(c.pid) / MB for name, c in self.named().items()}

    def check_alive(self) -> None:
        for name, c in self.named().items():
            if not c.alive():
                raise RuntimeError(f"the {name} exited:\n{c.tail()}")

    async def create_sale(self, hold_s: int) -> str:
        body = {"sku": "SOAK-1", "name": "bench soak sale", "price_cents": 1999,
                "stock": STOCK, "per_user_limit": PER_USER_LIMIT, "hold_seconds": hold_s}
        sale = await self._admin("POST", "/api/v1/sales", body)
        self.sales.append(str(sale["sale_id"]))
        return str(sale["sale_id"])


# ---------------------------------------------------------------------------
# Redis: a logical database of our own when the given server allows it
# ---------------------------------------------------------------------------


@dataclass
class RedisPlace:
    url: str
    db: int
    own_db: bool  # the db was empty at start: DBSIZE / INFO keyspace count only this run
    other_keys_start: int  # keys in the server's other dbs (other users of a shared server)
    other_keys_end: int = 0


def _with_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def _db_of(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else 0


async def _keyspace(redis: Redis) -> dict[int, int]:
    info: dict[str, Any] = await redis.info("keyspace")
    return {int(k[2:]): int(v["keys"]) for k, v in info.items()
            if k.startswith("db") and isinstance(v, dict)}


async def place_redis(url: str, *, keep_db: bool) -> RedisPlace:
    """A logical db of our own on a given server: the last empty one other than the URL's
    (whoever else uses the URL writes there), so its key counts are this run's alone.
    ``keep_db`` (our own embedded server): the URL's. used_memory is the whole server's."""
    db = _db_of(url)
    if urlsplit(url).scheme not in ("redis", "rediss"):
        return RedisPlace(url, db, False, 0)
    probe = Redis.from_url(url)
    dbs = REDIS_DBS
    try:
        used = await _keyspace(probe)
        with contextlib.suppress(Exception):  # CONFIG may be disabled
            dbs = int((await probe.config_get("databases")).get("databases") or REDIS_DBS)
    finally:
        await probe.aclose()
    if not keep_db:
        db = next((i for i in reversed(range(dbs)) if i != db and not used.get(i, 0)), db)
    own = not used.get(db, 0)
    return RedisPlace(_with_db(url, db), db, own, sum(n for i, n in used.items() if i != db))


# ---------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------


@dataclass
class Sample:
    t_s: float  # since the load started (negative: before)
    phase: str  # baseline | load | drained | settle | end
    front_rss_mb: float
    consumer_rss_mb: float
    compensator_rss_mb: float
    redis_used: int  # bytes (INFO memory used_memory): the whole server's
    redis_rss: int
    run_keys: int | None  # bytes of this run's keys: MEMORY USAGE of the sale's keys and the
    #   events stream, plus the live idempotency records times their mean size (own db only)
    other_keys: int  # keys in the server's other dbs: non-zero = a shared server
    xlen: int | None  # the sale's stream
    pel: int | None  # the "persist" group's pending entries
    lag: int | None  # entries not yet delivered to the group (None: Redis cannot tell)
    holds: int | None
    pending: int | None
    users: int | None
    idem_keys: int | None  # live idempotency records (own db: INFO keyspace expires)
    db_keys: int | None  # every key of the db (own db only)
    events: int  # the capped domain-events stream
    orders_inserted: int | None  # PostgreSQL's n_tup_ins of orders (stats, ~1 s behind)
    released: int | None  # PostgreSQL's n_tup_ins of releases: holds expired there so far
    returned: int | None  # n_tup_upd of releases: their stock returned in Redis so far
    overdue: int | None  # awaiting_payment rows past expiry (+1 s): the compensator's backlog
    chunk: int | None = None
    rps: float | None = None

    @property
    def redis_used_mb(self) -> float:
        return self.redis_used / MB

    @property
    def run_keys_mb(self) -> float | None:
        return None if self.run_keys is None else self.run_keys / MB

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["redis_used_mb"] = round(self.redis_used_mb, 2)
        d["run_keys_mb"] = None if self.run_keys is None else round(self.run_keys / MB, 2)
        for k in ("t_s", "front_rss_mb", "consumer_rss_mb", "compensator_rss_mb"):
            d[k] = round(d[k], 2)
        return d


_PG_SAMPLE = """
SELECT (SELECT coalesce(sum(n_tup_ins), 0) FROM pg_stat_user_tables
        WHERE relname = 'orders')::bigint AS inserted,
       (SELECT coalesce(sum(n_tup_ins), 0) FROM pg_stat_user_tables
        WHERE relname = 'releases')::bigint AS released,
       (SELECT coalesce(sum(n_tup_upd), 0) FROM pg_stat_user_tables
        WHERE relname = 'releases')::bigint AS returned,
       (SELECT count(*) FROM orders WHERE status = 'awaiting_payment'
        AND expires_at <= now() - interval '1 second') AS overdue
"""


@dataclass
class Probe:
    svc: SoakService
    redis: Redis
    b: Backends
    place: RedisPlace
    prefix: str
    t0: float = 0.0
    keys: SaleKeys | None = None
    idem_mean: float | None = None  # bytes of one idempotency record (measured once)

    @property
    def events_key(self) -> str:
        return events.stream_key(self.prefix)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _run_key_names(self) -> list[str]:
        names = [self.events_key]
        if self.keys is not None:
            names += list(self.keys.all_sale_keys())
        return names

    async def sample(self, phase: str) -> Sample:
        k = self.keys
        names = self._run_key_names()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.info("memory")
            pipe.info("keyspace")
            pipe.xlen(self.events_key)
            for name in names:
                pipe.memory_usage(name)  # SAMPLES 5: an estimate, O(1)
            if k is not None:
                pipe.xlen(k.stream)
                pipe.hlen(k.holds)
                pipe.hlen(k.pending)
                pipe.hlen(k.users)
                pipe.xinfo_groups(k.stream)
            res: list[Any] = await pipe.execute(raise_on_error=False)
        for r in res[:3]:
            if isinstance(r, Exception):
                raise r
        mem, keyspace, n_events = res[0], res[1], int(res[2])
        sizes, rest = res[3:3 + len(names)], res[3 + len(names):]
        run_keys = sum(int(x) for x in sizes if isinstance(x, int))
        xlen = holds = pending = users = pel = lag = None
        if k is not None:
            xlen, holds, pending, users = (int(v) for v in rest[:4])
            group = _group(rest[4], self.b.settings.consumer_group)
            if group is not None:
                pel = int(group["pending"])
                lag = None if group.get("lag") is None else int(group["lag"])
        db = keyspace.get(f"db{self.place.db}", {}) if self.place.own_db else None
        idem = None if db is None else int(db.get("expires", 0))
        if idem and self.idem_mean is None:
            self.idem_mean = await self._idem_mean()
        row = await self.b.pg.fetchrow(_PG_SAMPLE)
        rss = self.svc.rss()
        return Sample(
            t_s=self.now(), phase=phase, front_rss_mb=rss["front"],
            consumer_rss_mb=rss["consumer"], compensator_rss_mb=rss["compensator"],
            redis_used=int(mem["used_memory"]), redis_rss=int(mem["used_memory_rss"]),
            run_keys=None if idem is None else run_keys + round(idem * (self.idem_mean or 0)),
            other_keys=sum(int(v["keys"]) for name, v in keyspace.items()
                           if name != f"db{self.place.db}" and isinstance(v, dict)),
            xlen=xlen, pel=pel, lag=lag, holds=holds, pending=pending, users=users,
            idem_keys=idem, db_keys=None if db is None else int(db.get("keys", 0)),
            events=n_events,
            orders_inserted=int(row["inserted"]) if row else None,
            released=int(row["released"]) if row else None,
            returned=int(row["returned"]) if row else None,
            overdue=int(row["overdue"]) if row else None,
        )

    async def _idem_mean(self) -> float | None:
        sizes: list[int] = []
        async for key in self.redis.scan_iter(match=f"{self.prefix}:idem:*", count=1_000):
            size = await self.redis.memory_usage(key, samples=0)
            if size:
                sizes.append(int(size))
            if len(sizes) >= IDEM_SAMPLE_KEYS:
                break
        return statistics.fmean(sizes) if sizes else None

    async def count_idem(self) -> int:
        """Live idempotency records: INFO keyspace on an own db, else one SCAN."""
        if self.place.own_db:
            info: dict[str, Any] = await self.redis.info("keyspace")
            return int(info.get(f"db{self.place.db}", {}).get("expires", 0))
        n = 0
        async for _ in self.redis.scan_iter(match=f"{self.prefix}:idem:*", count=5_000):
            n += 1
        return n

    async def count_keys(self) -> int:
        """Keys under the run's prefix: DBSIZE on an own db, else one SCAN."""
        if self.place.own_db:
            return int(await self.redis.dbsize())
        n = 0
        async for _ in self.redis.scan_iter(match=f"{self.prefix}:*", count=5_000):
            n += 1
        return n

    async def drained(self) -> tuple[int, int]:
        """(XLEN, PEL) of the sale's stream."""
        assert self.keys is not None
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.keys.stream)
            pipe.xinfo_groups(self.keys.stream)
            xlen, groups = await pipe.execute()
        group = _group(groups, self.b.settings.consumer_group)
        return int(xlen), int(group["pending"]) if group else 0

    async def breakdown(self, idem_keys: int) -> dict[str, dict[str, int]]:
        """MEMORY USAGE (all elements) of the sale's structures and the events stream,
        and the mean size of an idempotency record times their number."""
        assert self.keys is not None
        k = self.keys
        out: dict[str, dict[str, int]] = {}
        parts = (("holds hash", k.holds, "hlen"), ("users hash", k.users, "hlen"),
                 ("pending hash", k.pending, "hlen"), ("order stream", k.stream, "xlen"),
                 ("sale hash", k.sale, None), ("events stream", self.events_key, "xlen"),
                 ("dead letters", k.dlq, "xlen"))
        for name, key, count in parts:
            size = await self.redis.memory_usage(key, samples=0)
            n = 1
            if count == "hlen":
                n = int(await self.redis.hlen(key))
            elif count == "xlen":
                n = int(await self.redis.xlen(key))
            out[name] = {"bytes": int(size or 0), "items": n}
        mean = (await self._idem_mean() or 0.0) if idem_keys else 0.0
        out["idempotency records"] = {"bytes": round(mean * idem_keys), "items": idem_keys}
        return out


def _group(groups: Any, name: str) -> dict[str, Any] | None:
    if isinstance(groups, Exception) or not groups:
        return None
    for g in groups:
        gname = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if gname == name:
            return dict(g)
    return None


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


@dataclass
class Chunk:
    index: int
    start_s: float
    end_s: float
    load: LoadResult
    cores: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "start_s": round(self.start_s, 2),
                "end_s": round(self.end_s, 2), "load": self.load.as_dict(), "cores": self.cores}


@dataclass
class Soak:
    opts: SoakOptions
    place: RedisPlace
    baseline: Sample | None = None
    sale_id: str = ""
    chunks: list[Chunk] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    drain_s: float = 0.0
    drained_breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    settle_s: float = 0.0
    end_breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    events_maxlen: int = 0  # the domain-events stream's cap (MAXLEN ~)
    keys_drained: int = 0  # keys under the prefix
    keys_end: int = 0
    check: dict[str, Any] = field(default_factory=dict)

    def at(self, phase: str) -> Sample:
        return next(s for s in reversed(self.samples) if s.phase == phase)


async def soak(opts: SoakOptions) -> int:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="flashsale-soak-"))
    try:
        with servers(workdir, embedded_redis=opts.own_redis) as (
                redis_url, admin_dsn, server_pids):
            place = await place_redis(redis_url, keep_db="redis" in server_pids)
            async with fresh_database(admin_dsn) as dsn:
                return await _run(opts, workdir, place, dsn, server_pids, started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _run(opts: SoakOptions, workdir: Path, place: RedisPlace, dsn: str,
               server_pids: dict[str, list[int]], started: str) -> int:
    result = Soak(opts, place)
    async with open_lab(opts.lab_options(), workdir, place.url, dsn, server_pids,
                        "soak") as lab:
        try:
            svc = SoakService(lab, "soak", "flashsale soak", 1,
                              env_extra={"FLASHSALE_IDEMPOTENCY_TTL_S": str(opts.idem_ttl_s)})
            try:
                async with open_backends(lab_settings(lab)) as b:
                    await _soak(lab, svc, Probe(svc, lab.redis, b, place, lab.prefix), result)
            finally:
                await svc.stop()
            meta = await _meta(opts, lab, started)
        finally:  # keys in the server's other dbs: a shared server
            with contextlib.suppress(Exception):
                place.other_keys_end = sum(n for i, n in (await _keyspace(lab.redis)).items()
                                           if i != place.db)
    doc = report(result, meta)
    md = opts.out_dir / "soak.md"
    js = opts.out_dir / "soak.json"
    md.write_text(doc["markdown"])
    js.write_text(json.dumps({k: v for k, v in doc.items() if k != "markdown"}, indent=2) + "\n")
    print()
    print(doc["markdown"])
    print(f"wrote {md}, {js}")
    if not result.check.get("ok"):
        print("soak: CORRECTNESS FAILED", file=sys.stderr)
        return 1
    return 0


async def _soak(lab: Lab, svc: SoakService, probe: Probe, result: Soak) -> None:
    opts = result.opts
    print(f"soak: {opts.load_s:g} s of load in {len(opts.chunks())} chunk(s), "
          f"{opts.connections} connections, {opts.users:,} buyers, sample every "
          f"{opts.sample_s:g} s; servers {'embedded' if lab.server_pids else 'given'}, "
          f"Redis db {result.place.db}"
          f"{'' if result.place.own_db else ' (shared: key counts by SCAN at the end)'}",
          flush=True)
    result.events_maxlen = probe.b.settings.events_maxlen
    await svc.start()
    await asyncio.sleep(1.0)  # connections made, scripts loaded, groups created
    probe.t0 = time.monotonic()
    result.baseline = await probe.sample("baseline")
    result.samples.append(result.baseline)
    result.sale_id = await svc.create_sale(opts.hold_s)
    probe.keys = SaleKeys(lab.prefix, result.sale_id)
    print(_head(), flush=True)
    print(_live(result.baseline), flush=True)
    await _load(lab, svc, probe, result)

    # drained: the load stopped, every accepted order persisted and trimmed from the stream
    t = time.monotonic()
    while True:
        svc.check_alive()
        xlen, pel = await probe.drained()
        if xlen == 0 and pel == 0:
            break
        if time.monotonic() - t > DRAIN_TIMEOUT_S:
            raise RuntimeError(f"the stream did not drain in {DRAIN_TIMEOUT_S:g} s "
                               f"(XLEN {xlen}, PEL {pel})")
        await asyncio.sleep(0.1)
    result.drain_s = time.monotonic() - t
    drained = await probe.sample("drained")
    result.samples.append(drained)
    print(_live(drained), flush=True)
    result.drained_breakdown = await probe.breakdown(await probe.count_idem())
    result.keys_drained = await probe.count_keys()

    # settle: every hold released by the compensator, every idempotency record expired
    t = time.monotonic()
    while time.monotonic() - t < opts.settle_max_s:
        await asyncio.sleep(min(opts.sample_s, max(0.0, opts.settle_max_s -
                                                   (time.monotonic() - t))))
        svc.check_alive()
        s = await probe.sample("settle")
        result.samples.append(s)
        print(_live(s), flush=True)
        idem = s.idem_keys if s.idem_keys is not None else await probe.count_idem()
        if not s.holds and not s.overdue and not idem:
            break
    result.settle_s = time.monotonic() - t
    end = await probe.sample("end")
    result.samples.append(end)
    idem_end = await probe.count_idem()
    result.end_breakdown = await probe.breakdown(idem_end)
    result.keys_end = await probe.count_keys()
    # quiesce: the compensator finishes its batch and exits, so no release is half done
    # (committed in PostgreSQL, stock not yet back in Redis) when the ledger is read
    assert svc.compensator is not None
    await asyncio.to_thread(svc.compensator.stop, COMPENSATOR_STOP_S)
    result.check = await _check(probe, result, idem_end)


async def _load(lab: Lab, svc: SoakService, probe: Probe, result: Soak) -> None:
    """wrk chunk after chunk; a sampler beside it every ``sample_s``."""
    opts = result.opts
    assert result.baseline is not None
    url = svc.orders_url(result.sale_id)
    done = asyncio.Event()
    start = probe.now()

    async def sampler() -> None:
        n = 0
        while not done.is_set():
            s = await probe.sample("load")
            result.samples.append(s)
            print(_live(s), flush=True)
            n += 1
            wait = start + n * opts.sample_s - probe.now()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), max(0.0, wait))

    task = asyncio.create_task(sampler())
    try:
        for i, seconds in enumerate(opts.chunks()):
            svc.check_alive()
            meter = procs.CpuMeter({**svc.cpu_groups(), **lab.server_pids})
            meter.begin()
            t = probe.now()
            load = await lab.load(url, seconds, f"soak{i}")
            cpu = meter.end()
            chunk = Chunk(i, t, probe.now(), load,
                          cpu_cores({**cpu, "loadgen": load.loadgen_cpu_s}, load.duration_s or 1))
            result.chunks.append(chunk)
            codes = " ".join(f"{k}:{v}" for k, v in sorted(load.status.items()))
            print(f"  chunk {i + 1}: {load.rps:,.0f} req/s, p99 {load.p99_ms:.1f} ms [{codes}] "
                  f"sock-err {load.socket_errors}; cores "
                  + " ".join(f"{k} {v:.2f}" for k, v in chunk.cores.items()), flush=True)
    finally:
        done.set()
        await task
    last = await probe.sample("load")
    result.samples.append(last)
    for s in result.samples:
        if s.phase == "load":
            c = _chunk_at(result.chunks, s.t_s)
            if c is not None:
                s.chunk, s.rps = c.index, c.load.rps


def _chunk_at(chunks: list[Chunk], t: float) -> Chunk | None:
    for c in chunks:
        if c.start_s <= t <= c.end_s:
            return c
    before = [c for c in chunks if c.end_s <= t]
    return before[-1] if before else (chunks[0] if chunks else None)


async def _check(probe: Probe, result: Soak, idem_end: int) -> dict[str, Any]:
    """As the bench checks a sale: ledger consistent, no oversell, every 202 a row; plus
    the stream trimmed after ack and nothing dead-lettered."""
    b, sale_id = probe.b, result.sale_id
    deadline = time.monotonic() + LEDGER_RETRY_S
    while True:  # a release committed in PostgreSQL but not yet in Redis is transient
        led = await ledger.ledger(b, sale_id)
        if led["consistent"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    rows = int(await b.pg.fetchval("SELECT count(*) FROM orders WHERE sale_id = $1", sale_id))
    client_202 = sum(c.load.count(202) for c in result.chunks)
    holding = led["awaiting_payment"] + led["paid"] + led["shipped"]
    released = led["cancelled"] + led["expired"] + led["failed"]
    oversell = max(0, holding - led["stock"], led["sold"] - led["stock"], -led["available"])
    lost = max(0, client_202 - rows)
    assert probe.keys is not None
    xlen = int(await b.redis.xlen(probe.keys.stream))
    dead = int(await b.redis.xlen(probe.keys.dlq))
    outbox = await b.pg.fetchrow(
        "SELECT count(*) AS n, coalesce(sum(quantity), 0)::bigint AS q FROM releases "
        "WHERE sale_id = $1 AND redis_released_at IS NULL", sale_id)
    assert outbox is not None
    ok = bool(led["consistent"]) and oversell == 0 and lost == 0 and xlen == 0 and dead == 0
    notes = []
    if rows > client_202:
        notes.append(f"{rows - client_202} accepted after wrk stopped reading (end of a chunk)")
    if led["failed"]:
        notes.append(f"{led['failed']} failed")
    if outbox["n"]:
        notes.append(f"{outbox['n']} releases committed in PostgreSQL, stock not yet back in "
                     "Redis (the compensator's outbox)")
    return {
        "ok": ok, "client_202": client_202, "rows": rows, "lost": lost, "oversell": oversell,
        "ledger": {k: v for k, v in led.items()}, "holding": holding, "released": released,
        "stream_xlen_after_drain": xlen, "dead_letters": dead,
        "idempotency_records_left": idem_end, "outbox_releases": int(outbox["n"]),
        "note": "; ".join(notes),
    }


async def _meta(opts: SoakOptions, lab: Lab, started: str) -> dict[str, Any]:
    return {
        "started": started, "machine": machine(), "cores": os.cpu_count(),
        "loadgen": wrk_version() if opts.loadgen == "wrk" else opts.loadgen,
        "threads": opts.threads, "connections": opts.connections, "users": opts.users,
        "load_s": opts.load_s, "chunks": opts.chunks(), "sample_s": opts.sample_s,
        "quick": opts.quick, "servers": "embedded" if lab.server_pids else "given",
        "postgres": await pg_settings(lab.dsn),
        "sale": {"stock": STOCK, "per_user_limit": PER_USER_LIMIT, "hold_seconds": opts.hold_s,
                 "price_cents": 1999},
        "idempotency_ttl_s": opts.idem_ttl_s, "settle_max_s": opts.settle_max_s,
        "processes": "flashsale serve --workers 1, flashsale consume, flashsale compensate",
    }


# ---------------------------------------------------------------------------
# the verdict and the report
# ---------------------------------------------------------------------------


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return 0.0
    mx = statistics.fmean(t for t, _ in points)
    my = statistics.fmean(v for _, v in points)
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return 0.0
    return sum((t - mx) * (v - my) for t, v in points) / sxx * 60


def _series(result: Soak, name: str, pick: Callable[[Sample], float | None],
            offset: float = 0.0) -> dict[str, Any]:
    half = result.opts.load_s / 2
    pts = []
    for s in result.samples:
        value = pick(s)
        if s.phase == "load" and s.t_s >= half and value is not None:
            pts.append((s.t_s, value - offset))
    if len(pts) < 3:
        return {"series": name, "points": len(pts), "flat": None, "level_mb": None,
                "slope_mb_per_min": None, "pct_of_level_per_min": None}
    level = statistics.fmean(v for _, v in pts)
    slope = slope_per_min(pts)
    pct = slope / level * 100 if level > 0 else math.inf
    return {"series": name, "points": len(pts), "level_mb": round(level, 2),
            "slope_mb_per_min": round(slope, 3), "pct_of_level_per_min": round(pct, 2),
            "flat": pct < FLAT_PCT_PER_MIN, "falling": pct <= -FLAT_PCT_PER_MIN,
            "first_mb": round(pts[0][1], 2),
            "last_mb": round(pts[-1][1], 2)}


def redis_trend(result: Soak, base_mb: float) -> dict[str, Any]:
    """Redis used_memory − baseline over the second half, fitted to a + b·items + c·t
    (items = live holds + live idempotency records): c is the growth per minute that
    the live state does not explain, reported like a series' slope."""
    name = "Redis used_memory − baseline, trend with the live state held fixed"
    pts = [(s.t_s, float((s.holds or 0) + (s.idem_keys or 0)), s.redis_used_mb - base_mb)
           for s in result.samples
           if s.phase == "load" and s.t_s >= result.opts.load_s / 2 and s.holds is not None]
    if len(pts) < 4:
        return {"series": name, "points": len(pts), "flat": None, "level_mb": None,
                "slope_mb_per_min": None, "pct_of_level_per_min": None}
    mt, mx, my = (statistics.fmean(p[i] for p in pts) for i in range(3))
    t = [p[0] - mt for p in pts]
    x = [p[1] - mx for p in pts]
    y = [p[2] - my for p in pts]
    sxx, stt = sum(v * v for v in x), sum(v * v for v in t)
    sxt = sum(a * b for a, b in zip(x, t, strict=True))
    sxy = sum(a * b for a, b in zip(x, y, strict=True))
    sty = sum(a * b for a, b in zip(t, y, strict=True))
    det = sxx * stt - sxt * sxt
    if det <= 0 or my <= 0:
        return {"series": name, "points": len(pts), "flat": None, "level_mb": None,
                "slope_mb_per_min": None, "pct_of_level_per_min": None}
    per_item_mb = (stt * sxy - sxt * sty) / det
    per_s = (sxx * sty - sxt * sxy) / det
    pct = per_s * 60 / my * 100
    return {"series": name, "points": len(pts), "level_mb": round(my, 2),
            "slope_mb_per_min": round(per_s * 60, 3), "pct_of_level_per_min": round(pct, 2),
            "flat": pct < FLAT_PCT_PER_MIN, "falling": pct <= -FLAT_PCT_PER_MIN,
            "first_mb": round(pts[0][2], 2), "last_mb": round(pts[-1][2], 2),
            "bytes_per_live_item": round(per_item_mb * MB, 1)}


def shared_redis(result: Soak) -> bool:
    """Other users' keys on the Redis server during the run: used_memory is not ours."""
    return (not result.place.own_db or result.place.other_keys_end > 0
            or any(s.other_keys for s in result.samples))


def verdict(result: Soak) -> dict[str, Any]:
    assert result.baseline is not None
    base = result.baseline.redis_used_mb
    opts = result.opts
    warm = max(opts.idem_ttl_s, opts.hold_s)
    short = opts.load_s / 2 < warm
    shared = shared_redis(result)
    used = _series(result, "Redis used_memory − baseline", lambda s: s.redis_used_mb, base)
    keys = _series(result, "Redis, this run's keys (MEMORY USAGE)", lambda s: s.run_keys_mb)
    if shared:
        used["series"] += " (shared server: not the run's alone)"
    front = _series(result, "front worker RSS", lambda s: s.front_rss_mb)
    # Redis holds the live state (holds of the last hold_s, records of the last TTL), so
    # its memory follows the throughput; a leak is growth that the live state does not explain.
    trend = redis_trend(result, base)
    redis = keys if shared else trend
    return {
        "rule": (f"a series is flat (not growing) when its least-squares slope over the second "
                 f"half of the load (t >= {opts.load_s / 2:g} s, after the warm-up) is under "
                 f"+{FLAT_PCT_PER_MIN:g} % of its mean level there, per minute; one falling "
                 f"faster than {FLAT_PCT_PER_MIN:g} %/min is shown as falling (Redis holds the "
                 "live holds and records, so it follows the throughput, which varies by chunk). "
                 "Redis is judged on the growth the live state does not explain: used_memory "
                 f"minus the baseline ({base:.2f} MB, taken before the sale existed) fitted by "
                 "least squares to a + b x (live holds + live idempotency records) + c x time; "
                 "c is the trend with the live state held fixed (a leak), b the bytes per live "
                 f"item{'; on a shared server, the run keys are judged instead' if shared else ''}"
                 ),
        "short_run": short,
        "short_run_note": (f"the second half starts before the warm-up is over (idempotency "
                           f"TTL {opts.idem_ttl_s} s, hold {opts.hold_s} s): records and holds "
                           "are still accumulating, so growth is expected; use --minutes 5"
                           ) if short else "",
        "redis_shared": shared,
        "front_flat": front["flat"],
        "redis_flat": redis["flat"],
        "front_rss": front,
        "redis_used_memory": used,
        "redis_run_keys": keys,
        "redis_trend": trend,
        "consumer_rss": _series(result, "consumer RSS (info)", lambda s: s.consumer_rss_mb),
        "compensator_rss": _series(result, "compensator RSS (info)",
                                   lambda s: s.compensator_rss_mb),
        "diagnosis": diagnosis(result),
    }


def _rate(a: int | None, b: int | None, dt: float) -> float | None:
    return None if a is None or b is None or dt <= 0 else round((b - a) / dt, 1)


def diagnosis(result: Soak) -> dict[str, Any]:
    """What moves in the second half: accepted vs returned holds, holds, records, events."""
    opts = result.opts
    half = opts.load_s / 2
    pts = [s for s in result.samples if s.phase == "load" and s.t_s >= half]
    if len(pts) < 2:
        return {"notes": []}
    a, b = pts[0], pts[-1]
    dt = b.t_s - a.t_s

    def per_min(pick: Callable[[Sample], int | None]) -> float | None:
        xy = [(s.t_s, float(v)) for s in pts if (v := pick(s)) is not None]
        return round(slope_per_min(xy), 1) if len(xy) >= 2 else None

    out: dict[str, Any] = {
        "accepted_per_s": _rate(a.orders_inserted, b.orders_inserted, dt),
        "returned_per_s": _rate(a.returned, b.returned, dt),
        "holds_per_min": per_min(lambda s: s.holds),
        "idem_records_per_min": per_min(lambda s: s.idem_keys),
        "events_per_min": per_min(lambda s: s.events),
        "overdue_at_end_of_load": b.overdue,
    }
    notes = []
    acc, ret = out["accepted_per_s"], out["returned_per_s"]
    if half >= opts.hold_s + 5 and acc and ret is not None and ret < 0.9 * acc:
        notes.append(f"holds accumulate: the compensator returned {ret:,.0f} holds/s while "
                     f"{acc:,.0f} orders/s were accepted ({_n(b.overdue)} holds past expiry "
                     "at the end of the load)")
    elif half < opts.hold_s + 5:
        notes.append(f"holds accumulate until hold_seconds ({opts.hold_s} s) have passed")
    if half < opts.idem_ttl_s:
        notes.append(f"idempotency records accumulate until their TTL ({opts.idem_ttl_s} s) "
                     "has passed")
    out["notes"] = notes
    return out


ORDER_STATE = ("holds hash", "users hash", "pending hash", "order stream")


def per_order(result: Soak) -> dict[str, Any]:
    """Redis bytes per held order once persisted, and the residue after expiry."""
    assert result.baseline is not None
    base = result.baseline
    drained, end = result.at("drained"), result.at("end")
    holds = drained.holds or 0
    accepted = int(result.check.get("rows", 0))
    shared = shared_redis(result)
    base_keys = base.run_keys or 0

    def div(x: float, n: int) -> float | None:
        return round(x / n, 1) if n else None

    def per(bd: dict[str, dict[str, int]], n: int) -> dict[str, Any]:
        return {k: {**v, "bytes_per_order": div(v["bytes"], n),
                    "bytes_per_item": div(v["bytes"], v["items"])} for k, v in bd.items()}

    d_keys = sum(v["bytes"] for v in result.drained_breakdown.values()) - base_keys
    d_state = sum(result.drained_breakdown[k]["bytes"] for k in ORDER_STATE)
    d_used = drained.redis_used - base.redis_used
    e_keys = sum(v["bytes"] for v in result.end_breakdown.values()) - base_keys
    e_used = end.redis_used - base.redis_used
    e_events = result.end_breakdown.get("events stream", {}).get("bytes", 0)
    complete = not end.holds and not result.check.get("idempotency_records_left")
    return {
        "baseline_used_bytes": base.redis_used, "baseline_run_keys_bytes": base_keys,
        "redis_shared": shared,
        "drained": {
            "live_holds": holds, "drain_wait_s": round(result.drain_s, 2),
            "order_state_bytes": d_state,
            "order_state_bytes_per_held_order": div(d_state, holds),
            "run_keys_bytes": d_keys, "run_keys_bytes_per_held_order": div(d_keys, holds),
            "used_minus_baseline_bytes": d_used,
            "used_bytes_per_held_order": div(d_used, holds),
            "keys_under_prefix": result.keys_drained,
            "breakdown": per(result.drained_breakdown, holds),
        },
        "after_expiry": {
            "complete": complete, "waited_s": round(result.settle_s, 1),
            "holds_left": end.holds,
            "idempotency_records_left": result.check.get("idempotency_records_left"),
            "orders_accepted": accepted,
            "run_keys_bytes": e_keys, "run_keys_bytes_per_accepted_order": div(e_keys, accepted),
            "events_stream_bytes": e_events,
            "run_keys_without_events_bytes": e_keys - e_events,
            "run_keys_without_events_bytes_per_accepted_order": div(e_keys - e_events, accepted),
            "used_minus_baseline_bytes": e_used,
            "used_bytes_per_accepted_order": div(e_used, accepted),
            "keys_under_prefix": result.keys_end,
            "breakdown": per(result.end_breakdown, accepted),
        },
    }


def _chunk_rates(result: Soak, c: Chunk) -> tuple[float, float | None]:
    """(202/s from wrk, holds returned per s from the samples inside the chunk)."""
    acc = c.load.count(202) / c.load.duration_s if c.load.duration_s else 0.0
    inside = [s for s in result.samples if s.phase == "load" and c.start_s <= s.t_s <= c.end_s
              and s.returned is not None]
    if len(inside) < 2 or inside[-1].t_s <= inside[0].t_s:
        return acc, None
    a, b = inside[0], inside[-1]
    assert a.returned is not None and b.returned is not None
    return acc, (b.returned - a.returned) / (b.t_s - a.t_s)


def _n(v: float | int | None, fmt: str = ",") -> str:
    return "–" if v is None else format(v, fmt)


def _mb(v: float | None) -> str:
    return "–" if v is None else f"{v / MB:,.2f} MB"


def _head() -> str:
    return ("  t s      phase     front  cons  comp  redis MB  run MB   xlen    PEL   holds"
            "  pending    idem   events   rows(PG) released returned overdue")


def _live(s: Sample) -> str:
    run = "–" if s.run_keys_mb is None else f"{s.run_keys_mb:.2f}"
    return (f"  {s.t_s:7.1f} {s.phase:<8} {s.front_rss_mb:6.1f} {s.consumer_rss_mb:5.1f} "
            f"{s.compensator_rss_mb:5.1f} {s.redis_used_mb:8.2f} {run:>7} {_n(s.xlen):>6} "
            f"{_n(s.pel):>6} {_n(s.holds):>7} {_n(s.pending):>7} {_n(s.idem_keys):>7} "
            f"{s.events:>8,} {_n(s.orders_inserted):>9} {_n(s.released):>8} "
            f"{_n(s.returned):>8} {_n(s.overdue):>7}")


def _fmt_series(v: dict[str, Any]) -> str:
    if v["flat"] is None:
        return f"| {v['series']} | – | – | – | n/a ({v['points']} samples in the 2nd half) |"
    per_item = (f"; {v['bytes_per_live_item']:,.0f} B per live item"
                if "bytes_per_live_item" in v else "")
    return (f"| {v['series']} | {v['level_mb']:,.1f} MB ({v['first_mb']:,.1f} → "
            f"{v['last_mb']:,.1f}{per_item}) | {v['slope_mb_per_min']:+.3f} MB/min | "
            f"{v['pct_of_level_per_min']:+.2f} % | {_series_word(v)} |")


def _series_word(v: dict[str, Any]) -> str:
    if v.get("falling"):
        return "flat (falling)"
    return "flat" if v["flat"] else "GROWING"


def _flat_word(flat: bool | None) -> str:
    return {True: "flat", False: "GROWING", None: "n/a"}[flat]


def report(result: Soak, meta: dict[str, Any]) -> dict[str, Any]:
    v = verdict(result)
    po = per_order(result)
    chk = result.check
    opts = result.opts
    place = result.place
    lines = [
        "# flashsale memory soak",
        "",
        f"{meta['started']}; {meta['machine']}; {meta['postgres']}; load generator "
        f"{meta['loadgen']} ({opts.threads} threads, {opts.connections} connections, "
        f"{opts.users:,} buyers, a unique Idempotency-Key per request).",
        f"Servers {meta['servers']}; Redis db {place.db} "
        + ("(empty at start: key counts are this run's" if place.own_db else
           "(not empty: idempotency records counted by SCAN at the end only")
        + f"; the server's other dbs held {place.other_keys_start:,} keys at start and "
        f"{place.other_keys_end:,} at the end"
        + (": SHARED, its used_memory is not the run's alone — `--own-redis` for a clean "
           "figure)." if v["redis_shared"] else ")."),
        f"Load: {opts.load_s:g} s in {len(result.chunks)} wrk run(s) of "
        f"{opts.chunks()[0]:g} s; a sample every {opts.sample_s:g} s."
        + (" QUICK smoke run: the figures mean nothing." if opts.quick else ""),
        f"Processes: {meta['processes']}. Sale: stock {STOCK:,} (never sells out), per-user "
        f"limit {PER_USER_LIMIT:,} (the API's maximum: never binds), hold_seconds "
        f"{opts.hold_s} (unpaid holds expire and the compensator returns their stock), "
        f"FLASHSALE_IDEMPOTENCY_TTL_S={opts.idem_ttl_s} (the smallest allowed: records expire "
        "during the run).",
        "",
        "## Verdict",
        "",
        f"Front worker RSS: **{_flat_word(v['front_flat'])}**; Redis memory: "
        f"**{_flat_word(v['redis_flat'])}**"
        + (" (judged on the run's keys: shared server)" if v["redis_shared"] else "") + ".",
        "",
        "| series | level (2nd half: first → last) | slope | of level per min | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key in ("front_rss", "redis_trend", "redis_used_memory", "redis_run_keys",
                "consumer_rss", "compensator_rss"):
        lines.append(_fmt_series(v[key]))
    lines += ["", f"Rule: {v['rule']}."]
    if v["short_run"]:
        lines.append(f"Short run: {v['short_run_note']}.")
    diag = v["diagnosis"]
    if "accepted_per_s" in diag:
        lines += ["", f"Second half: {_n(diag['accepted_per_s'], ',.0f')} orders/s accepted, "
                  f"{_n(diag['returned_per_s'], ',.0f')} holds/s returned by the compensator; "
                  f"holds {_n(diag['holds_per_min'], '+,.0f')}/min, idempotency records "
                  f"{_n(diag['idem_records_per_min'], '+,.0f')}/min, events "
                  f"{_n(diag['events_per_min'], '+,.0f')}/min."]
    for note in diag["notes"]:
        lines.append(f"- {note}")
    d, e = po["drained"], po["after_expiry"]
    expiry = ("all holds released, idempotency records expired" if e["complete"] else
              f"INCOMPLETE: {_n(e['holds_left'])} holds and "
              f"{_n(e['idempotency_records_left'])} idempotency records left")
    used_note = " (shared server: includes other users' changes)" if po["redis_shared"] else ""
    lines += [
        "",
        "## Redis memory per order",
        "",
        f"Drained (load stopped; XLEN 0 and PEL empty after {d['drain_wait_s']:g} s), "
        f"{d['live_holds']:,} live holds: an order once persisted keeps its hold and its "
        f"buyer's count — **{_n(d['order_state_bytes_per_held_order'])} bytes per held "
        f"order** (holds + users + pending + stream, MEMORY USAGE; pending and stream are "
        f"empty: trimmed after ack). With the idempotency records and the events stream: "
        f"this run's keys {_mb(d['run_keys_bytes'])} = "
        f"{_n(d['run_keys_bytes_per_held_order'])} bytes per held order; used_memory − "
        f"baseline {_mb(d['used_minus_baseline_bytes'])} = "
        f"{_n(d['used_bytes_per_held_order'])} bytes per held order{used_note}. "
        f"Keys under the prefix: {d['keys_under_prefix']:,}.",
        "",
        f"After expiry ({expiry}; waited {e['waited_s']:g} s): this run's keys "
        f"{_mb(e['run_keys_bytes'])} for {e['orders_accepted']:,} orders accepted, of which "
        f"the domain-events stream {_mb(e['events_stream_bytes'])} (capped at about "
        f"{result.events_maxlen:,} entries: a constant, not a per-order cost); without it "
        f"**{_n(e['run_keys_without_events_bytes_per_accepted_order'])} bytes per accepted "
        f"order** remain ({_n(e['run_keys_bytes_per_accepted_order'])} with it); "
        f"used_memory − baseline {_mb(e['used_minus_baseline_bytes'])} = "
        f"{_n(e['used_bytes_per_accepted_order'])} bytes per accepted order{used_note}. "
        f"Keys under the prefix: {e['keys_under_prefix']:,}.",
        "",
        "| structure | drained: bytes (items) | per held order | per item | after expiry: "
        "bytes (items) | per accepted order |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, dv in d["breakdown"].items():
        ev = e["breakdown"].get(name, {"bytes": 0, "items": 0, "bytes_per_order": None})
        lines.append(f"| {name} | {dv['bytes']:,} ({dv['items']:,}) | "
                     f"{_n(dv['bytes_per_order'])} | {_n(dv['bytes_per_item'])} | "
                     f"{ev['bytes']:,} ({ev['items']:,}) | {_n(ev['bytes_per_order'])} |")
    lines += [
        "",
        "## Correctness",
        "",
        f"{'ok' if chk['ok'] else 'FAILED'}: 202s (wrk) {chk['client_202']:,}, order rows "
        f"{chk['rows']:,} (lost {chk['lost']}), oversell {chk['oversell']}, ledger "
        f"{'consistent' if chk['ledger']['consistent'] else 'INCONSISTENT'} (available "
        f"{chk['ledger']['available']:,}, pending {chk['ledger']['pending']}, holding "
        f"{chk['holding']:,}, released {chk['released']:,}), stream XLEN after the drain "
        f"{chk['stream_xlen_after_drain']}, dead letters {chk['dead_letters']}"
        + (f"; {chk['note']}" if chk["note"] else "") + ".",
        "",
        "## Chunks",
        "",
        "202/s from wrk; returned/s = expired holds whose stock went back in Redis "
        "(PostgreSQL statistics) between the chunk's first and last sample.",
        "",
        "| chunk | t s | req/s | 202/s | returned/s | p99 ms | statuses | sock err | cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in result.chunks:
        acc, rel = _chunk_rates(result, c)
        codes = " ".join(f"{k}:{n:,}" for k, n in sorted(c.load.status.items()))
        cores = " ".join(f"{k} {x:.2f}" for k, x in c.cores.items())
        lines.append(f"| {c.index + 1} | {c.start_s:.0f}–{c.end_s:.0f} | {c.load.rps:,.0f} | "
                     f"{acc:,.0f} | {_n(None if rel is None else round(rel))} | "
                     f"{c.load.p99_ms:.1f} | {codes} | {c.load.socket_errors} | {cores} |")
    lines += [
        "",
        "## Samples",
        "",
        "RSS and Redis in MB; Redis = used_memory (the server's); run keys = MEMORY USAGE of "
        "the sale's keys and the events stream plus the idempotency records; XLEN of the "
        "sale's stream; PEL and lag of the consumer group; holds / pending = HLEN of the "
        "sale's hashes; idem = live idempotency records; events = the capped domain-events "
        "stream; rows / released = orders / releases inserted, returned = releases done in "
        "Redis (PostgreSQL statistics, about a second behind); overdue = holds past expiry "
        "(+1 s) not yet expired in PostgreSQL.",
        "",
        "| t s | phase | req/s (chunk) | front RSS | consumer RSS | compensator RSS | Redis | "
        "run keys | XLEN | PEL | lag | holds | pending | idem | events | rows | released | "
        "returned | overdue |",
        "| " + " | ".join(["---"] * 19) + " |",
    ]
    for s in result.samples:
        lines.append(
            f"| {s.t_s:.0f} | {s.phase} | {_n(None if s.rps is None else round(s.rps))} | "
            f"{s.front_rss_mb:.1f} | {s.consumer_rss_mb:.1f} | {s.compensator_rss_mb:.1f} | "
            f"{s.redis_used_mb:.2f} | {_n(s.run_keys_mb, '.2f')} | "
            f"{_n(s.xlen)} | {_n(s.pel)} | {_n(s.lag)} | "
            f"{_n(s.holds)} | {_n(s.pending)} | {_n(s.idem_keys)} | {s.events:,} | "
            f"{_n(s.orders_inserted)} | {_n(s.released)} | {_n(s.returned)} | "
            f"{_n(s.overdue)} |")
    md = "\n".join(lines) + "\n"
    place_d = asdict(place)
    place_d.pop("url", None)  # may carry a password
    return {
        "meta": {**meta, "redis": place_d}, "verdict": v, "memory_per_order": po,
        "correct": bool(chk["ok"]), "check": chk,
        "chunks": [{**c.as_dict(), "accepted_per_s": round(_chunk_rates(result, c)[0], 1),
                    "returned_per_s": _chunk_rates(result, c)[1]} for c in result.chunks],
        "samples": [s.as_dict() for s in result.samples], "markdown": md,
    }


def main(argv: list[str] | None = None) -> int:
    return uvloop.run(soak(options(argv)))


if __name__ == "__main__":
    sys.exit(main())
