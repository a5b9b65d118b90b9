"""Consumer drain: rows persisted per second for a backlog of accepted orders.

With no consumer running, a backlog is made through the real reservation
path (flashsale's Reserver, which coalesces into the real ``reserve_batch``
script) on an oversubscribed sale: ``orders`` distinct buyers plus 1 % more
than the stock. Then ``flashsale consume`` is started and the stream length
polled until it is empty. The rate is the steady one, from the first entry
acked to the last (the process start-up is reported apart), and the sale is
checked: every accepted order is a row, ledger consistent.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bench import procs
from bench.lab import Lab
from bench.targets import Check
from flashsale.config import Settings
from flashsale.core import ledger, sales
from flashsale.core.backends import Backends, open_backends
from flashsale.core.outcomes import Accepted
from flashsale.core.reserve import Reserver

CHUNK = 2_000
POLL_S = 0.01
TIMEOUT_S = 600.0


@dataclass
class DrainRun:
    orders: int
    steady_rows_per_s: float
    wall_rows_per_s: float
    startup_s: float
    drain_s: float
    backlog_build_s: float
    cpu_cores: dict[str, float]
    check: Check
    cpu_us_per_row: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["check"] = vars(self.check)
        return d


@dataclass
class DrainResult:
    runs: list[DrainRun] = field(default_factory=list)
    error: str | None = None

    def stat(self) -> tuple[float, float, float]:
        v = [r.steady_rows_per_s for r in self.runs]
        return (statistics.median(v), min(v), max(v)) if v else (0.0, 0.0, 0.0)

    @property
    def ok(self) -> bool:
        return self.error is None and all(r.check.ok for r in self.runs)

    def as_dict(self) -> dict[str, Any]:
        med, lo, hi = self.stat()
        return {"rows_per_s": {"median": med, "min": lo, "max": hi}, "correct": self.ok,
                "error": self.error, "runs": [r.as_dict() for r in self.runs]}


def lab_settings(lab: Lab) -> Settings:
    return Settings(
        redis_url=lab.redis_url, database_url=lab.dsn, admin_token=lab.admin_token,
        jwt_secret=lab.jwt_secret, webhook_secret=lab.webhook_secret, key_prefix=lab.prefix,
    )


async def _backlog(b: Backends, orders: int, run: int) -> tuple[str, int]:
    """A sale of ``orders`` stock, oversubscribed by 1 %; returns (sale, 202 count)."""
    new = sales.NewSale(
        sku="BENCH-DRAIN", name="bench drain", price_cents=1999, stock=orders, per_user_limit=1,
        starts_at=datetime.now(UTC), ends_at=None, hold_seconds=3600,
    )
    sale_id = str((await sales.create(b, new))["sale_id"])
    reserver = Reserver(b)
    attempts = orders + max(1, orders // 100)
    accepted = 0

    tag = sale_id[-8:]  # Idempotency-Keys are the buyer's, across sales: unique per backlog

    async def one(i: int) -> bool:
        result = await reserver.reserve(sale_id, f"d{run}-{i}", 1, f"drain-{tag}-{i}")
        return isinstance(result, Accepted)

    for start in range(0, attempts, CHUNK):
        done = await asyncio.gather(*(one(i) for i in range(start, min(attempts, start + CHUNK))))
        accepted += sum(done)
    await reserver.close()
    return sale_id, accepted


async def _drain_one(lab: Lab, b: Backends, run: int) -> DrainRun:
    orders = lab.opts.drain_orders
    t0 = time.monotonic()
    sale_id, accepted = await _backlog(b, orders, run)
    built = time.monotonic() - t0
    stream = b.keys(sale_id).stream
    backlog = int(await b.redis.xlen(stream))
    env = lab.child_env()
    spawned = time.monotonic()
    consumer = procs.start(
        f"drain-consumer-{run}", procs.python_module("flashsale", "consume"), env, lab.logs
    )
    spy = await _start_profile(lab, consumer.pid) if run == lab.opts.runs - 1 else None
    whole = procs.CpuMeter({"consumer": [consumer.pid]})
    whole.begin()
    meter = procs.CpuMeter({"consumer": [consumer.pid], **lab.server_pids})
    meter.begin()  # again at the first ack: the cores are those of the steady drain
    first_t: float | None = None
    first_left = backlog
    try:
        while True:
            left = int(await b.redis.xlen(stream))
            now = time.monotonic()
            if first_t is None and left < backlog:
                first_t, first_left = now, left
                meter.begin()
            if left == 0:
                break
            if now - spawned > TIMEOUT_S or not consumer.alive():
                raise RuntimeError(f"drain did not finish (left {left}):\n{consumer.tail()}")
            await asyncio.sleep(POLL_S)
        end = time.monotonic()
        cpu = meter.end()
        lifetime_cpu = whole.end()["consumer"]
    finally:
        await asyncio.to_thread(consumer.stop)
    if spy is not None:
        await _finish_profile(lab, spy, backlog, lifetime_cpu)
    first_t = first_t or end
    steady_s = max(1e-6, end - first_t)
    steady = first_left / steady_s if first_left else backlog / max(1e-6, end - spawned)
    check = await _check(b, sale_id, accepted)
    busy = max(1e-6, end - first_t)
    return DrainRun(
        orders=backlog, steady_rows_per_s=round(steady, 1),
        wall_rows_per_s=round(backlog / max(1e-6, end - spawned), 1),
        startup_s=round(first_t - spawned, 3), drain_s=round(end - spawned, 3),
        backlog_build_s=round(built, 2),
        cpu_cores=cpu_cores(cpu, busy), check=check,
        cpu_us_per_row={k: round(v / first_left * 1e6, 2) for k, v in cpu.items()
                        if k != "_machine"} if first_left else {},
    )


async def _start_profile(lab: Lab, pid: int) -> asyncio.subprocess.Process | None:
    """py-spy on the consumer for the whole drain (it stops when the consumer exits)."""
    from bench.measure import py_spy

    spy = py_spy()
    if not lab.opts.profile or spy is None:
        return None
    raw = lab.opts.out_dir / "profile-drain-0.raw"
    raw.parent.mkdir(parents=True, exist_ok=True)
    return await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--format", "raw",
        "--output", str(raw), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _finish_profile(
    lab: Lab, spy: asyncio.subprocess.Process, rows: int, consumer_cpu_s: float
) -> None:
    from bench.loadgen import LoadResult
    from bench.measure import summarize_profiles

    try:
        await asyncio.wait_for(spy.wait(), 30)
    except TimeoutError:
        spy.kill()
        return
    raw = lab.opts.out_dir / "profile-drain-0.raw"
    fake = LoadResult("drain", rows, 1.0, float(rows), 0, 0, 0, 0, 0, {}, 0, 0.0)
    us = consumer_cpu_s / rows * 1e6 if rows else 0.0
    text = summarize_profiles([raw], fake, us, "consumer drain, start-up included (per row)")
    (lab.opts.out_dir / "profile-drain.txt").write_text(text)


def cpu_cores(cpu: dict[str, float], wall_s: float) -> dict[str, float]:
    ours = {k: v for k, v in cpu.items() if k != "_machine"}
    out = {k: round(v / wall_s, 2) for k, v in ours.items()}
    if "_machine" in cpu:
        # the bench process itself polls the stream: counted with the others
        out["other"] = round(max(0.0, cpu["_machine"] - sum(ours.values())) / wall_s, 2)
    return out


async def _check(b: Backends, sale_id: str, accepted: int) -> Check:
    led = await ledger.ledger(b, sale_id)
    rows = int(await b.pg.fetchval("SELECT count(*) FROM orders WHERE sale_id = $1", sale_id))
    holding = led["awaiting_payment"] + led["paid"] + led["shipped"]
    oversell = max(0, accepted - led["stock"], holding - led["stock"])
    lost = max(0, accepted - rows)
    ok = bool(led["consistent"]) and oversell == 0 and lost == 0 and led["available"] == 0
    return Check(
        stock=led["stock"], client_202=accepted, accepted=led["stock"] - led["available"],
        persisted=rows, consistent=bool(led["consistent"]), oversell=oversell, lost=lost, ok=ok,
        note="" if rows == accepted else f"{rows - accepted} extra rows",
    )


async def measure_drain(lab: Lab) -> DrainResult:
    result = DrainResult()
    try:
        await _measure(lab, result)
    except Exception as exc:  # keep the other systems' figures
        result.error = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"  consumer drain: FAILED: {result.error}", flush=True)
    return result


async def _measure(lab: Lab, result: DrainResult) -> None:
    async with open_backends(lab_settings(lab)) as b:
        for i in range(lab.opts.runs):
            run = await _drain_one(lab, b, i)
            result.runs.append(run)
            cores = " ".join(f"{k} {v:.2f}" for k, v in run.cpu_cores.items())
            print(
                f"  {'consumer drain':<28} run {i + 1}: {run.steady_rows_per_s:>9,.0f} rows/s "
                f"(backlog {run.orders:,}; {run.drain_s:.1f} s incl. {run.startup_s:.2f} s "
                f"start-up; built in {run.backlog_build_s:.1f} s)\n"
                f"  {'':<28}        {run.check.summary()}\n"
                f"  {'':<28}        cpu cores: {cores}",
                flush=True,
            )
