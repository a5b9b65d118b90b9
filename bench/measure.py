"""How one system is measured: warm-up (discarded), N runs, correctness after each.

A run is one load-generator run on a fresh sale. An oversubscribed sale's
stock is sized from the last measured rate (about 90 % of the requests the
run will send), so it sells out inside the run; if it has not, short unmeasured
"tail" runs go on until it has. Then the system's own state is checked:
accepted == stock, every accepted order persisted (flashsale: the ledger,
after the consumer drained the stream), nothing oversold.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs
from bench.lab import Lab
from bench.loadgen import LoadResult
from bench.targets import Check, NaivePgTarget, Target

STOCK_SHARE = 0.9  # of the requests a run is expected to send
POOL_SHARE = 0.8  # of the buyer pool (per-user limit 1: one order per buyer)
WARM_STOCK = 1_000_000
WARM_CHUNK_S = 4.0
WARM_STABLE = 0.05
TAIL_CHUNK_S = 1.0
TAIL_MAX = 15


@dataclass
class RunResult:
    load: LoadResult
    cpu_s: dict[str, float]
    check: Check
    tail_requests: int = 0
    rss_mb: float | None = None
    redis_used_mb: float | None = None

    def cores(self) -> dict[str, float]:
        """Cores used per process group; "other" is the rest of the machine's busy time
        (other processes on this shared machine, the kernel's work for nobody in particular)."""
        d = self.load.duration_s or 1.0
        out = {"loadgen": round(self.load.loadgen_cores, 2)}
        ours = self.load.loadgen_cpu_s
        for k, v in self.cpu_s.items():
            if k != "_machine":
                out[k] = round(v / d, 2)
                ours += v
        if "_machine" in self.cpu_s:
            out["other"] = round(max(0.0, self.cpu_s["_machine"] - ours) / d, 2)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "load": self.load.as_dict(), "cpu_cores": self.cores(), "check": vars(self.check),
            "tail_requests": self.tail_requests, "front_rss_mb": self.rss_mb,
            "redis_used_mb": self.redis_used_mb,
            "cpu_us_per_request": {
                k: round(v / self.load.requests * 1e6, 1) if self.load.requests else None
                for k, v in self.cpu_s.items() if k != "_machine"
            },
        }


@dataclass
class SystemResult:
    key: str
    label: str
    kind: str
    workers: int
    runs: list[RunResult] = field(default_factory=list)
    warmup_s: float = 0.0
    warmup_rps: float = 0.0
    cache_coverage: float = 0.0  # estimated share of the buyer pool in each worker's JWT cache
    profile: str | None = None
    error: str | None = None

    def stat(self, pick: str) -> tuple[float, float, float]:
        values = [float(getattr(r.load, pick)) for r in self.runs]
        if not values:
            return (0.0, 0.0, 0.0)
        return statistics.median(values), min(values), max(values)

    @property
    def ok(self) -> bool:
        return self.error is None and all(r.check.ok for r in self.runs)

    def all_us_per_request(self) -> float:
        """Median CPU µs per request of every process of the system and the load generator."""
        v = [(sum(c for k, c in r.cpu_s.items() if k != "_machine") + r.load.loadgen_cpu_s)
             / r.load.requests * 1e6 for r in self.runs if r.load.requests]
        return round(statistics.median(v), 1) if v else 0.0

    def estimated_rps(self, cores: int) -> float:
        """Throughput the CPU cost per request allows on this machine with nothing else on
        it: one worker is bound by its own core, and everything by all the cores."""
        front, total = self.front_us_per_request(), self.all_us_per_request()
        if not front or not total:
            return 0.0
        bound = cores * 1e6 / total
        return round(min(bound, self.workers * 1e6 / front), 1)

    def statuses(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for r in self.runs:
            total.update(r.load.status)
        return total

    def front_us_per_request(self) -> float:
        """Median CPU µs of the front process(es) per request: robust to a busy machine."""
        v = [r.cpu_s.get("front", 0.0) / r.load.requests * 1e6 for r in self.runs
             if r.load.requests]
        return round(statistics.median(v), 1) if v else 0.0

    def median_cores(self) -> dict[str, float]:
        keys = {k for r in self.runs for k in r.cores()}
        return {k: round(statistics.median(r.cores().get(k, 0.0) for r in self.runs), 2)
                for k in sorted(keys)}

    def as_dict(self) -> dict[str, Any]:
        rps, p99 = self.stat("rps"), self.stat("p99_ms")
        return {
            "label": self.label, "kind": self.kind, "workers": self.workers,
            "rps": {"median": rps[0], "min": rps[1], "max": rps[2]},
            "p50_ms": self.stat("p50_ms")[0],
            "p99_ms": {"median": p99[0], "min": p99[1], "max": p99[2]},
            "statuses": dict(self.statuses()), "cpu_cores_median": self.median_cores(),
            "front_cpu_us_per_request": self.front_us_per_request(),
            "correct": self.ok, "warmup_s": round(self.warmup_s, 1),
            "warmup_rps": round(self.warmup_rps, 1), "profile": self.profile,
            "token_cache_coverage_after_warmup": self.cache_coverage,
            "error": self.error, "all_cpu_us_per_request": self.all_us_per_request(),
            "runs": [r.as_dict() for r in self.runs],
        }


QUICK_STOCK = 100


def _stock_for(lab: Lab, rate: float) -> int:
    if rate <= 0:  # no warm-up (--quick): a small stock that any load sells out
        return max(1, int(min(QUICK_STOCK, lab.opts.users * POOL_SHARE)))
    expected = rate * lab.opts.duration_s
    return max(1, int(min(expected * STOCK_SHARE, lab.opts.users * POOL_SHARE)))


def cache_passes(workers: int, coverage: float = 0.95) -> int:
    """Passes over the buyer pool after which each of ``workers`` processes has seen
    (and cached the verified JWT of) about ``coverage`` of the buyers: a request lands
    on any worker, so one pass warms 1/workers of each worker's cache."""
    if workers <= 1:
        return 1
    return math.ceil(math.log(1 - coverage) / math.log(1 - 1 / workers))


def cache_coverage(workers: int, requests: int, users: int) -> float:
    """Estimated share of the buyer pool in each worker's token cache after ``requests``
    (each thread of the load generator walks a shuffled permutation of its buyers)."""
    passes = requests / users if users > 0 else 0.0
    if workers <= 1:
        return min(1.0, passes)
    return float(1 - (1 - 1 / workers) ** passes)


async def _warmup(lab: Lab, target: Target, sale_id: str) -> tuple[float, float, int]:
    """Warm up until the rate is stable (two chunks within 5 %) and every worker's token
    cache is warm, or the time is up. Returns (seconds, last rate, requests)."""
    url = target.orders_url(sale_id)
    if lab.opts.warmup_s <= 0:
        return 0.0, 0.0, 0
    res = await lab.load(url, lab.opts.warmup_s, f"{target.key}w")
    spent, requests, rate = res.duration_s, res.requests, res.rps
    # the naive baseline is bound by PostgreSQL's row lock, not by token checks: no passes
    needed = 0 if isinstance(target, NaivePgTarget) else (
        lab.opts.users * cache_passes(target.workers))
    stable = False
    while not lab.opts.quick and spent + WARM_CHUNK_S <= lab.opts.warmup_max_s:
        if stable and requests >= needed:
            break
        res = await lab.load(url, WARM_CHUNK_S, f"{target.key}w")
        spent += res.duration_s
        requests += res.requests
        stable = rate > 0 and abs(res.rps - rate) / rate <= WARM_STABLE
        rate = res.rps
    return spent, rate, requests


async def _tail(lab: Lab, target: Target, sale_id: str) -> tuple[int, int]:
    """Unmeasured runs until the sale is sold out; returns (requests, 202s)."""
    requests = accepted = 0
    for _ in range(TAIL_MAX):
        left = await target.available(sale_id)
        if not left:
            break
        res = await lab.load(target.orders_url(sale_id), TAIL_CHUNK_S, f"{target.key}t")
        requests += res.requests
        accepted += res.count(202)
    return requests, accepted


async def _redis_used_mb(lab: Lab) -> float | None:
    try:
        info: dict[str, Any] = await lab.redis.info("memory")
    except Exception:
        return None
    return round(int(info["used_memory"]) / 2**20, 1)


async def measure(lab: Lab, target: Target, kind: str, *, sold_out: bool = False) -> SystemResult:
    """Warm up, then ``runs`` measured runs, each on a fresh sale and checked."""
    result = SystemResult(target.key, target.label, kind, target.workers)
    try:
        await _measure(lab, target, result, sold_out)
    except Exception as exc:  # one system failing must not lose the others' figures
        result.error = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"  {target.label}: FAILED: {result.error}", flush=True)
    finally:
        await target.stop()
    return result


async def _measure(lab: Lab, target: Target, result: SystemResult, sold_out: bool) -> None:
    kind = result.kind
    await target.start()
    warm = await target.new_sale(0 if sold_out else WARM_STOCK)
    result.warmup_s, result.warmup_rps, warm_requests = await _warmup(lab, target, warm)
    result.cache_coverage = round(
        cache_coverage(target.workers, warm_requests, lab.opts.users), 3)
    await target.settle()
    rate = result.warmup_rps
    for i in range(lab.opts.runs):
        run = await _one_run(lab, target, rate, sold_out, i)
        result.runs.append(run)
        rate = run.load.rps
        print(_line(result, run, i), flush=True)
    spy = py_spy()
    if lab.opts.profile and kind == "naive_pg":
        pass  # its time goes to PostgreSQL's row lock, not to Python
    elif lab.opts.profile and spy:
        try:
            result.profile = await profile(lab, target, rate, sold_out, spy)
        except (OSError, RuntimeError) as exc:  # a profile is extra: never lose the run
            print(f"  (profile of {target.label} failed: {exc!r})", flush=True)
    elif lab.opts.profile:
        print("  (py-spy not found: pip install py-spy to profile)", flush=True)


async def _one_run(lab: Lab, target: Target, rate: float, sold_out: bool, i: int) -> RunResult:
    stock: int | None = None
    if target.has_stock():
        stock = 0 if sold_out else _stock_for(lab, rate)
    sale_id = await target.new_sale(stock or 0)
    servers = lab.server_pids if target.has_stock() else {}
    meter = procs.CpuMeter({**target.cpu_groups(), **servers})
    meter.begin()
    load = await lab.load(target.orders_url(sale_id), lab.opts.duration_s, f"{target.key}{i}")
    cpu = meter.end()
    rss = target.rss_mb()
    tail_requests = tail_202 = 0
    if stock:
        tail_requests, tail_202 = await _tail(lab, target, sale_id)
    check = await target.check(sale_id, stock, load.count(202) + tail_202)
    return RunResult(load, cpu, check, tail_requests, rss, await _redis_used_mb(lab))


def _line(result: SystemResult, run: RunResult, i: int) -> str:
    ld = run.load
    cores = " ".join(f"{k} {v:.2f}" for k, v in run.cores().items())
    codes = " ".join(f"{k}:{v}" for k, v in sorted(ld.status.items()))
    return (
        f"  {result.label:<28} run {i + 1}: {ld.rps:>9,.0f} req/s  p50 {ld.p50_ms:6.2f} ms  "
        f"p99 {ld.p99_ms:7.2f} ms  [{codes}]  sock-err {ld.socket_errors}\n"
        f"  {'':<28}        {run.check.summary()}\n"
        f"  {'':<28}        cpu cores: {cores}"
    )


# ---------------------------------------------------------------------------
# profiling (py-spy, an extra unmeasured run)
# ---------------------------------------------------------------------------


def py_spy() -> str | None:
    """py-spy on PATH or beside this interpreter (a venv's bin/)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


async def profile(lab: Lab, target: Target, rate: float, sold_out: bool, spy: str) -> str:
    """py-spy on every front worker during one extra run; returns the summary's path."""
    stock = 0 if sold_out else _stock_for(lab, rate)
    sale_id = await target.new_sale(stock)
    out = lab.opts.out_dir / f"profile-{target.key}"
    out.parent.mkdir(parents=True, exist_ok=True)
    duration = max(2, round(lab.opts.duration_s))
    spies = []
    for n, pid in enumerate(target.worker_pids()):
        raw = out.with_name(f"{out.name}-{n}.raw")
        spies.append((raw, await asyncio.create_subprocess_exec(
            spy, "record", "--pid", str(pid), "--duration", str(duration + 1),
            "--rate", "200", "--nonblocking", "--format", "raw", "--output", str(raw),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )))
    await asyncio.sleep(0.5)
    meter = procs.CpuMeter(target.cpu_groups())
    meter.begin()
    load = await lab.load(target.orders_url(sale_id), duration, f"{target.key}p")
    front_s = meter.end().get("front", 0.0)
    for _raw, proc in spies:
        await proc.wait()
    if stock:
        await _tail(lab, target, sale_id)
    await target.check(sale_id, stock, 0)
    summary = out.with_suffix(".txt")
    us = front_s / load.requests * 1e6 if load.requests else 0.0
    summary.write_text(summarize_profiles([raw for raw, _ in spies], load, us, target.label))
    return str(summary)


# the first frame (from the leaf up) in one of these packages owns a sample;
# standard-library frames (asyncio streams, json, hmac, base64 ...) count for their caller
CATEGORIES = {
    "jwt": "JWT verification (PyJWT; token-cache misses)",
    "redis": "Redis client (redis-py: pack, send, read, parse)",
    "aiohttp": "HTTP server (aiohttp: parse, route, respond, socket writes)",
    "multidict": "HTTP server (aiohttp: parse, route, respond, socket writes)",
    "yarl": "HTTP server (aiohttp: parse, route, respond, socket writes)",
    "prometheus_client": "metrics (prometheus_client)",
    "asyncpg": "PostgreSQL client (asyncpg)",
    "flashsale": "flashsale's own code (handlers, validation, reserver)",
    "bench": "bench server code",
}
EVENT_LOOP = "event loop and stdlib (uvloop in C, asyncio tasks, futures)"


def _frame(frame: str) -> tuple[str, str]:
    """``func (pkg/mod.py:123)`` -> (``func (pkg/mod.py)``, ``pkg``)."""
    name, _, loc = frame.partition(" (")
    path = loc.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({path})", path.split("/", 1)[0] if "/" in path else ""


def summarize_profiles(raws: list[Path], load: LoadResult, front_us: float, label: str) -> str:
    """Self, inclusive and per-library shares of the samples, and µs per request."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_category: Counter[str] = Counter()
    total = 0
    for raw in raws:
        if not raw.exists():
            continue
        for line in raw.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_frame(f) for f in stack.split(";") if f]
            if not frames:
                continue
            total += count
            own[frames[-1][0]] += count
            for f in {name for name, _ in frames}:
                inclusive[f] += count
            owner = next((CATEGORIES[pkg] for _, pkg in reversed(frames) if pkg in CATEGORIES),
                         EVENT_LOOP)
            by_category[owner] += count

    def row(n: int) -> str:
        share = n / max(1, total)
        return f"  {share:6.1%}  {share * front_us:7.1f} µs/req"

    lines = [
        f"py-spy profile of {label} ({time.strftime('%Y-%m-%d %H:%M:%S')}), "
        f"{len(raws)} worker(s), {total} busy samples at 200 Hz (--nonblocking)",
        f"load during the profile: {load.rps:,.0f} req/s, p99 {load.p99_ms:.2f} ms; "
        f"front CPU {front_us:.0f} µs per request (all workers; µs columns = share × that)",
        "",
        "by library (a sample belongs to the innermost frame of a known package):",
    ]
    lines += [f"{row(n)}  {c}" for c, n in by_category.most_common()]
    lines += ["", "self (time in the function itself):"]
    lines += [f"{row(n)}  {f}" for f, n in own.most_common(30)]
    lines += ["", "inclusive (the function and what it calls):"]
    lines += [f"{row(n)}  {f}" for f, n in inclusive.most_common(70)]
    return "\n".join(lines) + "\n"
