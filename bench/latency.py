"""Open-loop latency: what a buyer waits at a given arrival rate (no coordinated omission).

The reserve path's capacity is the closed-loop throughput of its best
configuration, measured earlier in the same run. At 25 %, 50 % and 80 % of it,
bench/openloop/openloop.c sends requests at a constant rate (each one due at
t0 + i / rate, sent on any idle keep-alive connection) and measures each
latency from the time the request was due. The same rates are sent to the echo
ceiling with the same number of workers: the HTTP stack's own share. Each level
is a fresh sale with more stock than the level sends (every buyer once), so the
latencies are those of accepted orders, and each is checked (ledger consistent,
every 202 persisted, nothing oversold). The generator's CPU is reported.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from bench import loadgen, procs
from bench.lab import Lab
from bench.loadgen import OpenLoopResult
from bench.measure import WARM_STOCK, _warmup
from bench.targets import Check, EchoTarget, FlashsaleTarget, Target

LEVELS = (0.25, 0.5, 0.8)
CONNECTIONS = 64
STOCK_MARGIN = 1.2


@dataclass
class Level:
    system: str
    share: float
    result: OpenLoopResult
    cpu_cores: dict[str, float]
    check: Check | None

    def as_dict(self) -> dict[str, Any]:
        r = self.result
        return {
            "system": self.system, "share_of_capacity": self.share, "offered": r.offered,
            "achieved": round(r.achieved, 1), "p50_ms": r.p50_ms, "p90_ms": r.p90_ms,
            "p99_ms": r.p99_ms, "p999_ms": r.p999_ms, "max_ms": r.max_ms,
            "status": r.status, "errors": r.errors, "max_send_lag_ms": r.max_send_lag_ms,
            "loadgen_cores": round(r.loadgen_cores, 3),
            "loadgen_cpu_us_per_request": (
                round(r.loadgen_cpu_s / r.sent * 1e6, 1) if r.sent else None),
            "cpu_cores": self.cpu_cores, "check": vars(self.check) if self.check else None,
        }


@dataclass
class OpenLoop:
    capacity_rps: float = 0.0
    capacity_from: str = ""
    workers: int = 1
    levels: list[Level] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(lv.check is None or lv.check.ok for lv in self.levels)

    def of(self, system: str) -> list[Level]:
        return [lv for lv in self.levels if lv.system == system]

    def as_dict(self) -> dict[str, Any]:
        return {
            "capacity_rps": round(self.capacity_rps, 1), "capacity_from": self.capacity_from,
            "workers": self.workers, "connections": CONNECTIONS, "error": self.error,
            "levels": [lv.as_dict() for lv in self.levels],
        }


async def _levels(lab: Lab, target: Target, system: str, out: OpenLoop) -> None:
    await target.start()
    try:
        warm = await target.new_sale(0 if not target.has_stock() else WARM_STOCK)
        await _warmup(lab, target, warm)  # every worker's token cache warm, rate stable
        await target.settle()
        for share in LEVELS:
            rate = max(1.0, out.capacity_rps * share)
            stock = int(rate * lab.opts.duration_s * STOCK_MARGIN) + 10
            sale_id = await target.new_sale(stock)
            groups = target.cpu_groups()
            if target.has_stock():
                groups = {**groups, **lab.server_pids}
            meter = procs.CpuMeter(groups)
            meter.begin()
            res = await loadgen.run_openloop(
                target.orders_url(sale_id), lab.tokens_file, rate=rate,
                duration_s=lab.opts.duration_s, connections=CONNECTIONS,
                nonce=f"ol{system}{share}.{secrets.token_hex(3)}",
            )
            cpu = meter.end()
            d = res.duration_s or 1.0
            cores = {k: round(v / d, 3) for k, v in cpu.items() if k != "_machine"}
            cores["loadgen"] = round(res.loadgen_cores, 3)
            check = None
            if isinstance(target, FlashsaleTarget):
                check = await target.check(sale_id, stock, res.count(202), sold_out=False)
            out.levels.append(Level(system, share, res, cores, check))
            codes = " ".join(f"{k}:{v}" for k, v in sorted(res.status.items()))
            errs = " ".join(f"{k}:{v}" for k, v in res.errors.items() if v)
            print(f"  open loop {system:<8} {share:>4.0%} offered {res.offered:>8,.0f}/s "
                  f"achieved {res.achieved:>8,.0f}/s  p50 {res.p50_ms:6.2f}  p99 "
                  f"{res.p99_ms:7.2f}  p99.9 {res.p999_ms:7.2f} ms  [{codes}] {errs}  "
                  f"generator {res.loadgen_cores:.2f} cores"
                  + (f"\n  {'':<28}{check.summary()}" if check else ""), flush=True)
    finally:
        await target.stop()


async def measure_open_loop(lab: Lab, capacity_rps: float, capacity_from: str,
                            workers: int) -> OpenLoop:
    out = OpenLoop(capacity_rps=capacity_rps, capacity_from=capacity_from, workers=workers)
    try:
        reserve = FlashsaleTarget(lab, f"openloop_reserve_w{workers}",
                                  f"open loop, flashsale reserve ({workers} w)", workers)
        await _levels(lab, reserve, "reserve", out)
        echo = EchoTarget(lab, f"openloop_echo_w{workers}", f"open loop, echo ({workers} w)",
                          workers)
        await _levels(lab, echo, "echo", out)
    except Exception as exc:  # keep the other figures
        out.error = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"  open loop: FAILED: {out.error}", flush=True)
    return out
