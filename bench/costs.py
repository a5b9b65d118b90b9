"""CPU per accepted order, per sold-out answer and per drained row, by process.

From the /proc CPU of each process over the measured runs (bench/procs.py):

* a sold-out answer: the sold-out system's CPU per request (every answer is a
  remembered 409), per process;
* an accepted order: a reserve run answers ``a`` 202s and ``n - a`` refusals
  (the sale sells out near its end), so per process
  ``(cpu - refusals × sold-out cost) / a``, the median over the runs. The
  front's CPU, Redis's, the consumer's, PostgreSQL's and the compensator's:
  every process the order costs, while it is made and while it is persisted;
* a drained row: the drain's CPU per row, per process (consumer, Redis,
  PostgreSQL).

The ratios divide by the echo ceiling's front CPU per request in the same run
(same number of workers): µs differ between machines, the ratio much less.

The model (bench/README.md): with per-request costs c_p of each process p, a
front of N processes, one Redis core and PostgreSQL, throughput is
min over p of (cores given to p) / c_p; on a machine where everything shares
C cores it is also at most C' / Σ c_p (the load generator included; C' = C less
the cores the rest of a shared machine kept busy during the run). It is
checked against the 1- and 2-worker reserve runs of this machine.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from bench.drain import DrainResult
from bench.measure import SystemResult

PROCESSES = ("front", "redis", "consumer", "postgres", "compensator")


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def per_request(r: SystemResult) -> dict[str, float]:
    """Median CPU µs per request of each process of a system (load generator too)."""
    out: dict[str, float] = {}
    for p in (*PROCESSES, "loadgen"):
        v = []
        for run in r.runs:
            if not run.load.requests:
                continue
            cpu = run.load.loadgen_cpu_s if p == "loadgen" else run.cpu_s.get(p)
            if cpu is not None:
                v.append(cpu / run.load.requests * 1e6)
        m = _median(v)
        if m is not None:
            out[p] = m
    return out


def _with_total(d: dict[str, float]) -> dict[str, float]:
    out = {p: d[p] for p in PROCESSES if p in d}
    out["total"] = round(sum(out.values()), 1)
    return out


def per_accepted(reserve: SystemResult, soldout: SystemResult | None) -> dict[str, float]:
    refused_cost = per_request(soldout) if soldout else {}
    out: dict[str, float] = {}
    for p in PROCESSES:
        v = []
        for run in reserve.runs:
            accepted = run.load.count(202)
            if not accepted or p not in run.cpu_s:
                continue
            refused = run.load.requests - accepted
            cpu_us = run.cpu_s[p] * 1e6 - refused * refused_cost.get(p, 0.0)
            v.append(max(0.0, cpu_us) / accepted)
        m = _median(v)
        if m is not None:
            out[p] = m
    return _with_total(out)


def per_row(drain: DrainResult) -> dict[str, float]:
    keys = {k for r in drain.runs for k in r.cpu_us_per_row}
    out = {}
    for k in keys:
        m = _median([r.cpu_us_per_row[k] for r in drain.runs if k in r.cpu_us_per_row])
        if m is not None:
            out[k] = m
    return _with_total(out)


def _pick(results: list[SystemResult], kind: str, workers: int | None) -> SystemResult | None:
    mine = [r for r in results if r.kind == kind and r.runs]
    same = [r for r in mine if workers is None or r.workers == workers]
    pool = same or mine
    return max(pool, key=lambda r: r.stat("rps")[0], default=None)


def model_check(results: list[SystemResult], accepted: dict[str, float],
                sold_out: dict[str, float]) -> list[dict[str, Any]]:
    """The model's throughput for each measured reserve configuration of this
    machine (its 202 share, its load generator's CPU) against the measured one."""
    cores = os.cpu_count() or 1
    out = []
    for r in results:
        if r.kind != "reserve" or not r.runs:
            continue
        requests = sum(run.load.requests for run in r.runs)
        share = sum(run.load.count(202) for run in r.runs) / requests if requests else 0.0
        mix = {p: share * accepted.get(p, 0.0) + (1 - share) * sold_out.get(p, 0.0)
               for p in PROCESSES}
        loadgen = per_request(r).get("loadgen", 0.0)
        total = sum(mix.values()) + loadgen
        # on a shared machine the cores the rest of it kept busy were not ours
        free = max(0.1, cores - r.median_cores().get("other", 0.0))
        bounds = {
            "fronts": r.workers * 1e6 / mix["front"] if mix["front"] else None,
            "redis_core": 1e6 / mix["redis"] if mix["redis"] else None,
            "machine_cores": free * 1e6 / total if total else None,
        }
        finite = [b for b in bounds.values() if b]
        predicted = min(finite) if finite else None
        measured = r.stat("rps")[0]
        out.append({
            "system": r.key, "workers": r.workers, "accepted_share": round(share, 3),
            "free_cores": round(free, 2),
            "bounds_rps": {k: round(v) if v else None for k, v in bounds.items()},
            "predicted_rps": round(predicted) if predicted else None,
            "measured_rps": round(measured),
            "measured_vs_predicted": round(measured / predicted, 3) if predicted else None,
        })
    return out


def summarize_costs(results: list[SystemResult], drain: DrainResult | None) -> dict[str, Any]:
    reserve = _pick(results, "reserve", None)
    workers = reserve.workers if reserve else None
    soldout = _pick(results, "soldout", workers)
    echo = _pick(results, "echo", workers)
    echo_front = per_request(echo).get("front") if echo else None
    accepted = per_accepted(reserve, soldout) if reserve else {}
    refused = _with_total(per_request(soldout)) if soldout else {}
    row = per_row(drain) if drain and drain.runs else {}

    def ratio(v: float | None) -> float | None:
        return round(v / echo_front, 3) if v is not None and echo_front else None

    return {
        "cpu_us_per_order": accepted,
        "cpu_us_per_sold_out": refused,
        "cpu_us_per_drained_row": row,
        "echo_front_us_per_request": echo_front,
        "cpu_vs_echo": {
            "order_total": ratio(accepted.get("total")),
            "drain_row": ratio(row.get("total")),
            "sold_out_total": ratio(refused.get("total")),
            "order_front": ratio(accepted.get("front")),
        },
        "from": {"reserve": reserve.key if reserve else None,
                 "soldout": soldout.key if soldout else None,
                 "echo": echo.key if echo else None},
        "model_check": model_check(results, accepted, refused) if accepted else [],
    }
