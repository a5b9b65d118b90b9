"""Ratios, targets and the three result files: latest.md, latest.json, latest.png."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.drain import DrainResult
from bench.measure import SystemResult
from bench.plot import Bar, plot

TARGETS = {
    "reserve_vs_echo": (">=", 0.75),
    "reserve_vs_naive_pg": (">=", 20.0),
    "p99_reserve_ms": ("<=", 10.0),
    "soldout_vs_echo": (">=", 0.9),
    "drain_vs_reserve": (">=", 10.0),
}


@dataclass
class Summary:
    reserve: SystemResult | None
    echo_for_reserve: SystemResult | None
    naive: SystemResult | None
    soldout: SystemResult | None
    echo_for_soldout: SystemResult | None
    ratios: dict[str, float | None]
    estimated: dict[str, float | None]
    p99: dict[str, float | None]
    oversell: int
    lost: int
    targets: dict[str, dict[str, Any]]


def _best(results: list[SystemResult], kind: str) -> SystemResult | None:
    mine = [r for r in results if r.kind == kind and r.runs]
    return max(mine, key=lambda r: r.stat("rps")[0], default=None)


def _echo(results: list[SystemResult], workers: int) -> SystemResult | None:
    echoes = [r for r in results if r.kind == "echo" and r.runs]
    same = [r for r in echoes if r.workers == workers]
    pool = same or echoes
    return pool[0] if pool else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _rps(r: SystemResult | None) -> float | None:
    return r.stat("rps")[0] if r is not None else None


def _p99(r: SystemResult | None) -> float | None:
    return round(r.stat("p99_ms")[0], 3) if r is not None else None


def summarize(results: list[SystemResult], drain: DrainResult | None) -> Summary:
    reserve = _best(results, "reserve")
    soldout = _best(results, "soldout")
    naive = _best(results, "naive_pg")
    echo_r = _echo(results, reserve.workers if reserve else 1)
    echo_s = _echo(results, soldout.workers if soldout else 1)
    drain_rate = drain.stat()[0] if drain and drain.runs else None
    ratios = {
        "reserve_vs_echo": _ratio(_rps(reserve), _rps(echo_r)),
        "reserve_vs_naive_pg": _ratio(_rps(reserve), _rps(naive)),
        "soldout_vs_echo": _ratio(_rps(soldout), _rps(echo_s)),
        "drain_vs_reserve": _ratio(drain_rate, _rps(reserve)),
    }
    cores = os.cpu_count() or 1

    def est(r: SystemResult | None) -> float | None:
        return r.estimated_rps(cores) if r is not None and r.runs else None

    estimated = {
        "reserve_vs_echo": _ratio(est(reserve), est(echo_r)),
        "reserve_vs_naive_pg": None,  # naive is bound by PostgreSQL's row lock, not CPU
        "soldout_vs_echo": _ratio(est(soldout), est(echo_s)),
        "drain_vs_reserve": _ratio(drain_rate, est(reserve)),
    }
    p99 = {"reserve": _p99(reserve), "naive_pg": _p99(naive), "echo": _p99(echo_r),
           "soldout": _p99(soldout)}
    checks = [run.check for r in results for run in r.runs]
    checks += [run.check for run in (drain.runs if drain else [])]
    values = {**ratios, "p99_reserve_ms": p99["reserve"]}
    targets: dict[str, dict[str, Any]] = {}
    for name, (op, bound) in TARGETS.items():
        v = values.get(name)
        ok = None if v is None else (v >= bound if op == ">=" else v <= bound)
        targets[name] = {"value": v, "target": f"{op} {bound:g}", "ok": ok}
    return Summary(
        reserve, echo_r, naive, soldout, echo_s, ratios, estimated, p99,
        oversell=sum(c.oversell for c in checks), lost=sum(c.lost for c in checks),
        targets=targets,
    )


def _fmt_rps(r: SystemResult) -> str:
    med, lo, hi = r.stat("rps")
    return f"{med:,.0f} ({lo:,.0f}–{hi:,.0f})"


def _fmt_p99(r: SystemResult) -> str:
    med, lo, hi = r.stat("p99_ms")
    return f"{med:.2f} ({lo:.2f}–{hi:.2f})"


def _fmt_codes(r: SystemResult) -> str:
    total = r.statuses()
    n = sum(total.values()) or 1
    return " ".join(f"{k} {v / n:.0%}" for k, v in sorted(total.items()))


def _fmt_cores(cores: dict[str, float]) -> str:
    order = ["loadgen", "front", "consumer", "redis", "postgres", "other"]
    return " / ".join(f"{k} {cores[k]:.2f}" for k in order if k in cores)


def _fmt_check(r: SystemResult) -> str:
    checks = [run.check for run in r.runs]
    if all(c.stock is None for c in checks):
        return "n/a (no backend)"
    parts = []
    for c in checks:
        if c.stock == 0:
            parts.append(f"{c.client_202} accepted of 0")
        else:
            parts.append(f"{c.client_202:,}/{c.stock:,}")
    head = "ok" if r.ok else "**FAILED**"
    led = " ledger consistent," if any(c.consistent for c in checks) else ""
    over, lost = sum(c.oversell for c in checks), sum(c.lost for c in checks)
    return f"{head}:{led} 202s/stock {'; '.join(parts)}; oversell {over}, lost {lost}"


def markdown(results: list[SystemResult], drain: DrainResult | None, s: Summary,
             meta: dict[str, Any]) -> str:
    lines = [
        "# flashsale bench — latest run",
        "",
        f"{meta['started']} · {meta['machine']} · load generator: {meta['loadgen']} "
        f"(-t{meta['threads']} -c{meta['connections']}), {meta['runs']} measured run(s) of "
        f"{meta['duration_s']:g} s per system after a discarded warm-up "
        f"({meta['warmup']}) · buyers: "
        f"{meta['users']:,} pre-minted JWTs, per-user limit 1, unique Idempotency-Key per request"
        + (" · **--quick: smoke run, figures mean nothing**" if meta["quick"] else ""),
        "",
        "| system | req/s median (min–max) | p50 ms | p99 ms median (min–max) | responses "
        "| CPU µs/req front / all | CPU cores (median) | correctness (every run) |",
        "| --- | ---: | ---: | ---: | --- | ---: | --- | --- |",
    ]
    for r in results:
        if r.error and not r.runs:
            lines.append(f"| {r.label} | **ERROR** | | | | | | {r.error[:200]} |")
            continue
        if not r.runs:
            continue
        lines.append(
            f"| {r.label} | {_fmt_rps(r)} | {r.stat('p50_ms')[0]:.2f} | {_fmt_p99(r)} | "
            f"{_fmt_codes(r)} | {r.front_us_per_request():,.0f} / {r.all_us_per_request():,.0f} | "
            f"{_fmt_cores(r.median_cores())} "
            f"| {_fmt_check(r)}{' ERROR: ' + r.error[:200] if r.error else ''} |"
        )
    if drain and drain.error and not drain.runs:
        lines.append(f"| consumer drain | **ERROR** | | | | | | {drain.error[:200]} |")
    if drain and drain.runs:
        med, lo, hi = drain.stat()
        d0 = drain.runs[0]
        cores = {k: statistics_median([run.cpu_cores.get(k, 0.0) for run in drain.runs])
                 for k in d0.cpu_cores}
        over = sum(r.check.oversell for r in drain.runs)
        lost = sum(r.check.lost for r in drain.runs)
        rows = "; ".join(f"{r.check.persisted:,} rows/{r.orders:,}" for r in drain.runs)
        lines.append(
            f"| consumer drain (backlog {d0.orders:,}) | {med:,.0f} rows/s ({lo:,.0f}–{hi:,.0f}) "
            f"| – | – | start-up {d0.startup_s:.2f} s excluded | – | {_fmt_cores(cores)} | "
            f"{'ok' if drain.ok else '**FAILED**'}: ledger consistent, {rows}; "
            f"oversell {over}, lost {lost} |"
        )
    cover = ", ".join(f"{r.label} {r.cache_coverage:.0%}" for r in results
                      if r.runs and r.warmup_s > 0)
    if cover:
        lines += ["", "Estimated share of the buyers' verified JWTs in each front worker's cache "
                  f"after the warm-up: {cover}."]
    lines += ["", "## Targets (ratios from this run)", "",
              "| target | measured | goal | holds | CPU-cost estimate |",
              "| --- | ---: | --- | --- | ---: |"]
    for name, t in s.targets.items():
        v = t["value"]
        e = s.estimated.get(name)
        shown = "–" if v is None else (f"{v:.2f} ms" if name.endswith("_ms") else f"{v:.2f}×")
        holds = "–" if t["ok"] is None else ("yes" if t["ok"] else "**no**")
        lines.append(f"| {name} | {shown} | {t['target']} | {holds} | "
                     f"{'–' if e is None else f'{e:.2f}×'} |")
    lines += [
        "",
        "CPU-cost estimate: the same ratio computed from each system's measured CPU per request "
        "(its processes and the load generator) as the throughput this machine would give "
        "with nothing else on it — min(workers × 1 core / front µs, all cores / all µs). It "
        "matters when the \"other\" column shows the machine was shared during the run.",
    ]
    lines += [
        "",
        f"reserve = {s.reserve.label if s.reserve else '–'} (the faster flashsale configuration),"
        f" compared with {s.echo_for_reserve.label if s.echo_for_reserve else '–'} "
        "(same number of front processes); "
        f"sold-out = {s.soldout.label if s.soldout else '–'} vs "
        f"{s.echo_for_soldout.label if s.echo_for_soldout else '–'}. "
        f"Oversold: {s.oversell}; lost: {s.lost}.",
        "",
        "Notes: wrk is closed-loop (64 connections each waiting for its answer), so p99 "
        "includes queueing in the server; CPU cores are the processes' /proc utime+stime over "
        "the measured run (1.00 = one core busy; this machine has "
        f"{meta['cores']}); \"other\" is the rest of the machine's busy CPU (other work on this "
        "shared machine, kernel). CPU µs/req: the front processes' CPU per answered request, and "
        "that of all the system's processes plus the load generator — the figures least "
        "disturbed by other load. With 64 closed-loop connections the mean latency is "
        "64 / throughput (Little's law), so p99 <= 10 ms needs well over 6,400 req/s. "
        "Each run uses a fresh sale sized to sell out inside the run (a few % of the "
        "responses are then 409 sold_out); short unmeasured runs top it up "
        "when it did not. Correctness is checked on each system's own state after the run "
        "(flashsale: `GET /api/v1/admin/sales/{id}/ledger` once the stream is drained). "
        "\"accepted after the load generator stopped reading\" are 202s whose answers wrk "
        "dropped when its time was up; they are persisted and counted in the ledger.",
    ]
    if meta.get("plot") == "fallback":
        lines += ["", "latest.png was drawn without matplotlib (bars only, no labels): "
                  "`pip install matplotlib` for the labelled chart."]
    return "\n".join(lines) + "\n"


def statistics_median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def write(results: list[SystemResult], drain: DrainResult | None, meta: dict[str, Any],
          out_dir: Path) -> tuple[Path, Path, Path]:
    s = summarize(results, drain)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "latest.png"
    bars_rps = [Bar(r.label, *r.stat("rps")) for r in results if r.runs]
    bars_p99 = [Bar(r.label, *r.stat("p99_ms")) for r in results if r.runs]
    if drain and drain.runs:
        bars_rps.append(Bar("consumer drain (rows/s)", *drain.stat()))
    meta["plot"] = plot(bars_rps, bars_p99, png,
                        f"flashsale bench {meta['started']} — {meta['machine']}")
    md = out_dir / "latest.md"
    md.write_text(markdown(results, drain, s, meta))
    doc: dict[str, Any] = {
        "ratios": s.ratios,
        "ratios_cpu_estimate": s.estimated,
        "p99_ms": s.p99,
        "oversell": s.oversell,
        "lost": s.lost,
        "targets": s.targets,
        "reserve_system": s.reserve.key if s.reserve else None,
        "meta": meta,
        "systems": {r.key: r.as_dict() for r in results},
        "drain": drain.as_dict() if drain else None,
    }
    js = out_dir / "latest.json"
    js.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return md, js, png
