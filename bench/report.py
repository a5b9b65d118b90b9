"""Ratios, targets and the three result files: latest.md, latest.json, latest.png."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import costs
from bench.drain import DrainResult
from bench.history import HistoryResult
from bench.hotsku import HotSkuResult
from bench.latency import OpenLoop
from bench.measure import SystemResult
from bench.plot import Bar, Curve, plot

TARGETS = {
    "reserve_vs_echo": (">=", 0.75),
    "reserve_vs_naive_pg": (">=", 20.0),
    "p99_reserve_ms": ("<=", 10.0),
    "soldout_vs_echo": (">=", 0.9),
    "drain_vs_reserve": (">=", 10.0),
}
# issue 14: CPU as a ratio to the echo ceiling's front CPU per request, open-loop
# latency, the hot-SKU ceiling, and the cost of history
TARGETS_14 = {
    "cpu_order_vs_echo": ("<=", 2.0),
    "cpu_drain_row_vs_echo": ("<=", 0.4),
    "open_loop_p99_at_50pct_ms": ("<=", 10.0),
    "open_loop_p999_at_50pct_ms": ("<=", 25.0),
    "open_loop_p99_at_80pct_ms": ("<=", 25.0),
    "hot_sku_accepted_per_core_s": (">=", 100_000.0),
    "history_reserve_ratio": (">=", 0.95),
    "history_drain_ratio": (">=", 0.95),
    "idle_consume_cores_history": ("<=", 0.01),
    "idle_compensate_cores_history": ("<=", 0.01),
}


@dataclass
class Extras:
    """The issue-14 measurements (each None when not run)."""

    open_loop: OpenLoop | None = None
    hot_sku: HotSkuResult | None = None
    history: HistoryResult | None = None


def _judge(name: str, v: float | None, table: dict[str, tuple[str, float]]) -> dict[str, Any]:
    op, bound = table[name]
    ok = None if v is None else (v >= bound if op == ">=" else v <= bound)
    return {"value": v, "target": f"{op} {bound:g}", "ok": ok}


def _level(ol: OpenLoop | None, system: str, share: float) -> dict[str, Any] | None:
    if ol is None:
        return None
    for lv in ol.of(system):
        if abs(lv.share - share) < 1e-9:
            return lv.as_dict()
    return None


def history_ratio(h: HistoryResult | None, results: list[SystemResult],
                  drain: DrainResult | None) -> dict[str, float | None]:
    """Rates on the database with history over the fresh database's (same run)."""
    if h is None:
        return {"reserve": None, "drain": None}
    fresh = [r for r in results if r.kind == "reserve" and r.workers == 1 and r.runs]
    hr = h.reserve.stat("rps")[0] if h.reserve and h.reserve.runs else None
    fr = fresh[0].stat("rps")[0] if fresh else None
    hd = h.drain.stat()[0] if h.drain and h.drain.runs else None
    fd = drain.stat()[0] if drain and drain.runs else None
    return {"reserve": _ratio(hr, fr), "drain": _ratio(hd, fd)}


def extra_doc(results: list[SystemResult], drain: DrainResult | None,
              extras: Extras) -> dict[str, Any]:
    """latest.json's issue-14 keys, their targets included."""
    c = costs.summarize_costs(results, drain)
    ol = extras.open_loop
    open_loop = {}
    if ol is not None:
        for lv in ol.levels:
            d = lv.as_dict()
            open_loop[f"{lv.system}_{round(lv.share * 100)}pct"] = {
                k: d[k] for k in ("offered", "achieved", "p50_ms", "p99_ms", "p999_ms")}
    hot = extras.hot_sku.summary() if extras.hot_sku else None
    hratio = history_ratio(extras.history, results, drain)
    idle = extras.history.idle if extras.history else {}
    r50, r80 = _level(ol, "reserve", 0.5), _level(ol, "reserve", 0.8)
    values = {
        "cpu_order_vs_echo": c["cpu_vs_echo"]["order_total"],
        "cpu_drain_row_vs_echo": c["cpu_vs_echo"]["drain_row"],
        "open_loop_p99_at_50pct_ms": r50["p99_ms"] if r50 else None,
        "open_loop_p999_at_50pct_ms": r50["p999_ms"] if r50 else None,
        "open_loop_p99_at_80pct_ms": r80["p99_ms"] if r80 else None,
        "hot_sku_accepted_per_core_s": hot["accepted"] if hot else None,
        "history_reserve_ratio": hratio["reserve"],
        "history_drain_ratio": hratio["drain"],
        "idle_consume_cores_history": idle.get("history", {}).get("consume"),
        "idle_compensate_cores_history": idle.get("history", {}).get("compensate"),
    }
    return {
        "cpu_us_per_order": c["cpu_us_per_order"],
        "cpu_us_per_sold_out": c["cpu_us_per_sold_out"],
        "cpu_us_per_drained_row": c["cpu_us_per_drained_row"],
        "cpu_vs_echo": c["cpu_vs_echo"],
        "cpu_costs_from": {**c["from"], "echo_front_us_per_request":
                           c["echo_front_us_per_request"]},
        "cpu_model_check": c["model_check"],
        "open_loop": open_loop,
        "open_loop_detail": ol.as_dict() if ol else None,
        "hot_sku_decisions_per_s": hot,
        "history_ratio": hratio,
        "history": extras.history.as_dict() if extras.history else None,
        "targets_14": {k: _judge(k, v, TARGETS_14) for k, v in values.items()},
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
    order = ["loadgen", "front", "consumer", "compensator", "redis", "postgres", "other"]
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


def _f(v: Any, fmt: str = "{:,.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown_extra(d: dict[str, Any], extras: Extras) -> list[str]:
    """latest.md's issue-14 sections."""
    lines: list[str] = []
    procs_ = (*costs.PROCESSES, "total")
    src = d["cpu_costs_from"]
    lines += ["", "## CPU per order, by process (µs; /proc utime+stime)", "",
              "| per | " + " | ".join(procs_) + " | × echo front |",
              "| --- | " + " | ".join("---:" for _ in procs_) + " | ---: |"]
    ratios = d["cpu_vs_echo"]
    for label, key, ratio in (
        (f"accepted order ({src['reserve']})", "cpu_us_per_order", ratios["order_total"]),
        (f"sold-out answer ({src['soldout']})", "cpu_us_per_sold_out",
         ratios["sold_out_total"]),
        ("drained row (consumer drain)", "cpu_us_per_drained_row", ratios["drain_row"]),
    ):
        row = d[key]
        lines.append(f"| {label} | " + " | ".join(_f(row.get(p)) for p in procs_)
                     + f" | {_f(ratio, '{:.2f}×')} |")
    lines += ["", f"Echo ceiling front ({src['echo']}): "
              f"{_f(src['echo_front_us_per_request'])} µs per request. An accepted order's "
              "CPU is the reserve runs' CPU less the refusals' (each at the sold-out "
              "answer's cost), over the 202s; the consumer, Redis and PostgreSQL include "
              "persisting it (see bench/costs.py)."]
    if d["cpu_model_check"]:
        lines += ["", "Model check (bench/README.md): throughput = min(N fronts / front µs, "
                  "1 Redis core / Redis µs, free machine cores / all µs incl. the load generator; "
                  "free = cores less the rest of the machine's busy share), "
                  "per-request costs mixed by each configuration's 202 share:", "",
                  "| configuration | 202 share | fronts bound | Redis-core bound | "
                  "machine bound | predicted | measured | measured / predicted |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for m in d["cpu_model_check"]:
            b = m["bounds_rps"]
            lines.append(
                f"| {m['system']} | {m['accepted_share']:.0%} | {_f(b['fronts'], '{:,}')} | "
                f"{_f(b['redis_core'], '{:,}')} | {_f(b['machine_cores'], '{:,}')} | "
                f"{_f(m['predicted_rps'], '{:,}')} | {m['measured_rps']:,} | "
                f"{_f(m['measured_vs_predicted'], '{:.2f}')} |")
    ol = extras.open_loop
    if ol is not None:
        lines += ["", f"## Open-loop latency (bench/openloop, constant arrival rate, latency "
                  f"from each request's due time; {ol.workers} worker(s), 64 connections)", "",
                  f"Capacity: {ol.capacity_rps:,.0f} req/s ({ol.capacity_from}, closed loop, "
                  "this run). The echo ceiling gets the same rates.", ""]
        if ol.error:
            lines.append(f"**ERROR**: {ol.error[:300]}")
        lines += ["| system | share | offered/s | achieved/s | p50 ms | p99 ms | p99.9 ms | "
                  "max ms | responses | generator cores (µs/req) | correctness |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
        for lv in ol.levels:
            x = lv.as_dict()
            errs = sum(x["errors"].values())
            codes = " ".join(f"{k}:{v:,}" for k, v in sorted(x["status"].items()))
            lines.append(
                f"| {lv.system} | {lv.share:.0%} | {x['offered']:,.0f} | {x['achieved']:,.0f} | "
                f"{x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['p999_ms']:.2f} | "
                f"{x['max_ms']:.1f} | {codes}{f' errors {errs}' if errs else ''} | "
                f"{x['loadgen_cores']:.2f} ({_f(x['loadgen_cpu_us_per_request'])}) | "
                f"{lv.check.summary() if lv.check else 'n/a'} |")
    hot = extras.hot_sku
    if hot is not None:
        lines += ["", "## Hot-SKU ceiling (reserve_batch fed directly, one sale, unique "
                  "buyers and keys; decisions per second of Redis main-thread CPU, INFO cpu)",
                  ""]
        if hot.error:
            lines.append(f"**ERROR**: {hot.error[:300]}")
        lines += ["| AOF | outcome | batch | decisions/s per core | Redis µs per decision "
                  "(main) | decisions per process CPU-s |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in hot.runs:
            x = r.as_dict()
            lines.append(f"| {r.aof} | {r.outcome} | {r.batch} | {x['decisions_per_core_s']:,} "
                         f"| {_f(x['redis_main_us_per_decision'], '{:.2f}')} | "
                         f"{_f(x['decisions_per_process_cpu_s'], '{:,}')} |")
    h = extras.history
    if h is not None:
        hr = d["history_ratio"]
        lines += ["", f"## Cost of history ({h.sales:,} ended sales, {h.orders:,} orders, "
                  f"written in {h.populate_s:.0f} s)", ""]
        if h.error:
            lines.append(f"**ERROR**: {h.error[:300]}")
        hres = h.reserve.stat("rps")[0] if h.reserve and h.reserve.runs else None
        hdr = h.drain.stat()[0] if h.drain and h.drain.runs else None
        lines += [f"- reserve (1 worker): {_f(hres, '{:,.0f}')} req/s on history, "
                  f"{_f(hr['reserve'], '{:.3f}')} × the fresh database's"
                  + (f" ({'correct' if h.reserve.ok else '**FAILED**'})" if h.reserve else ""),
                  f"- drain: {_f(hdr, '{:,.0f}')} rows/s on history, "
                  f"{_f(hr['drain'], '{:.3f}')} × the fresh database's"
                  + (f" ({'correct' if h.drain.ok else '**FAILED**'})" if h.drain else "")]
        for db in ("fresh", "history"):
            idle = h.idle.get(db, {})
            lines.append(f"- idle cores, {db} database: " + ", ".join(
                f"{k} {v:.3f}" for k, v in idle.items()))
    lines += ["", "## Targets of issue 14 (ratios from this run)", "",
              "| target | measured | goal | holds |", "| --- | ---: | --- | --- |"]
    for name, t in d["targets_14"].items():
        v = t["value"]
        holds = "–" if t["ok"] is None else ("yes" if t["ok"] else "**no**")
        lines.append(f"| {name} | {_f(v, '{:,.3f}') if v is None or v < 1000 else f'{v:,.0f}'} "
                     f"| {t['target']} | {holds} |")
    return lines


def write(results: list[SystemResult], drain: DrainResult | None, meta: dict[str, Any],
          out_dir: Path, extras: Extras | None = None) -> tuple[Path, Path, Path]:
    extras = extras or Extras()
    s = summarize(results, drain)
    d14 = extra_doc(results, drain, extras)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "latest.png"
    bars_rps = [Bar(r.label, *r.stat("rps")) for r in results if r.runs]
    bars_p99 = [Bar(r.label, *r.stat("p99_ms")) for r in results if r.runs]
    if drain and drain.runs:
        bars_rps.append(Bar("consumer drain (rows/s)", *drain.stat()))
    curves = []
    if extras.open_loop is not None:
        for system in ("reserve", "echo"):
            lv = extras.open_loop.of(system)
            if lv:
                xs = [x.result.offered for x in lv]
                for pct, pick in (("p50", "p50_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms")):
                    curves.append(Curve(f"{system} {pct}", xs,
                                        [float(getattr(x.result, pick)) for x in lv]))
    meta["plot"] = plot(bars_rps, bars_p99, png,
                        f"flashsale bench {meta['started']} — {meta['machine']}", curves)
    md = out_dir / "latest.md"
    md.write_text(markdown(results, drain, s, meta)
                  + "\n".join(markdown_extra(d14, extras)) + "\n")
    doc: dict[str, Any] = {
        "ratios": s.ratios,
        "ratios_cpu_estimate": s.estimated,
        "p99_ms": s.p99,
        "oversell": s.oversell,
        "lost": s.lost,
        "targets": s.targets,
        "reserve_system": s.reserve.key if s.reserve else None,
        **d14,
        "meta": meta,
        "systems": {r.key: r.as_dict() for r in results},
        "drain": drain.as_dict() if drain else None,
    }
    js = out_dir / "latest.json"
    js.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return md, js, png
