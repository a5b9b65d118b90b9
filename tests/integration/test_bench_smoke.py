"""Smoke runs of the bench code (`python -m bench.run --quick`, `python -m bench.soak --quick`):
seconds, no figures asserted.

It checks that one quick pass over every system writes the three result files
and that latest.json has the keys the issues ask for (issue 14: CPU per order
by process, the open-loop levels, the hot-SKU ceiling, the history ratios). Against the test run's
servers when the suite has them, else the bench starts its own. The load
generator is wrk when installed, else the built-in Python client; a second
pass forces the Python client so that path is exercised too. The memory soak
runs a few seconds of load and must write soak.md and soak.json with its keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


def _server_env(request: pytest.FixtureRequest) -> dict[str, str]:
    env = dict(os.environ)
    try:
        redis_url, database_url = request.getfixturevalue("server_urls")
    except pytest.FixtureLookupError:
        return env
    env["FLASHSALE_REDIS_URL"] = redis_url
    env["FLASHSALE_DATABASE_URL"] = database_url
    return env


def _bench(env: dict[str, str], out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )


def _assert_written(out: Path, proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    detail = f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for name in ("latest.md", "latest.json", "latest.png"):
        assert (out / name).is_file(), f"{name} not written\n{detail}"
        assert (out / name).stat().st_size > 0, f"{name} is empty\n{detail}"
    assert (out / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "latest.json").read_text())
    assert isinstance(doc, dict)
    return doc


def test_quick_bench_writes_the_three_files(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    proc = _bench(_server_env(request), tmp_path)
    doc = _assert_written(tmp_path, proc)
    ratios = doc["ratios"]
    assert isinstance(ratios, dict)
    assert {"reserve_vs_echo", "reserve_vs_naive_pg", "soldout_vs_echo",
            "drain_vs_reserve"} <= set(ratios)
    p99 = doc["p99_ms"]
    assert isinstance(p99, dict)
    assert {"reserve", "naive_pg", "echo"} <= set(p99)
    assert "oversell" in doc and "lost" in doc
    md = (tmp_path / "latest.md").read_text()
    assert "| system |" in md
    # issue 14: CPU per order by process, open loop, hot SKU, history
    detail = f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, detail
    per_order = doc["cpu_us_per_order"]
    assert {"front", "consumer", "compensator", "total"} <= set(per_order)
    assert {"order_total", "drain_row"} <= set(doc["cpu_vs_echo"])
    assert doc["cpu_us_per_drained_row"]["total"] is not None
    levels = doc["open_loop"]
    assert {"reserve_25pct", "reserve_50pct", "reserve_80pct", "echo_50pct"} <= set(levels)
    for level in levels.values():
        assert {"offered", "achieved", "p50_ms", "p99_ms", "p999_ms"} <= set(level)
        assert level["achieved"] > 0
    assert doc["open_loop_detail"]["levels"][0]["loadgen_cores"] is not None
    hot = doc["hot_sku_decisions_per_s"]
    assert hot["accepted"] and hot["sold_out"], hot
    assert {"reserve", "drain"} <= set(doc["history_ratio"])
    assert doc["history_ratio"]["reserve"] and doc["history_ratio"]["drain"]
    assert {"fresh", "history"} <= set(doc["history"]["idle_cores"])
    assert "cpu_order_vs_echo" in doc["targets_14"]
    for heading in ("## CPU per order", "## Open-loop latency", "## Hot-SKU ceiling",
                    "## Cost of history", "## Targets of issue 14"):
        assert heading in md
    # the price of one replica acknowledging (bench/replicated.py), same run
    cost = doc["meta"]["replica_ack_cost"]
    assert {"throughput_ratio", "p99_ratio"} <= set(cost)
    assert "one replica acknowledging vs none" in md
    # the waiting room's figures (bench/room.py), this run's room.json
    room = json.loads((tmp_path / "room.json").read_text())
    assert "## Waiting room" in md and f"| polls vs echo | {room['polls_vs_echo']} |" in md


def test_quick_bench_python_load_generator(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    proc = _bench(_server_env(request), tmp_path, "--loadgen", "python", "--systems",
                  "echo,openloop")
    doc = _assert_written(tmp_path, proc)
    assert doc["meta"]["loadgen"] == "python"
    assert doc["open_loop"]["echo_25pct"]["achieved"]


def test_quick_soak_writes_its_report(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--quick", "--minutes", "0.05", "--sample-s", "0.5",
         "--settle-max-s", "1", "--out", str(tmp_path)],
        cwd=ROOT, env=_server_env(request), capture_output=True, text=True, timeout=TIMEOUT_S,
        check=False,
    )
    detail = f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, detail
    for name in ("soak.md", "soak.json"):
        assert (tmp_path / name).is_file(), f"{name} not written\n{detail}"
    doc = json.loads((tmp_path / "soak.json").read_text())
    assert {"meta", "verdict", "memory_per_order", "correct", "check", "chunks",
            "samples"} <= set(doc)
    assert doc["correct"] is True
    verdict = doc["verdict"]
    assert {"rule", "front_rss", "redis_used_memory", "redis_run_keys", "front_flat",
            "redis_flat"} <= set(verdict)
    assert {"slope_mb_per_min", "level_mb", "flat"} <= set(verdict["front_rss"])
    per_order = doc["memory_per_order"]
    assert {"order_state_bytes_per_held_order", "run_keys_bytes_per_held_order",
            "used_bytes_per_held_order", "breakdown"} <= set(per_order["drained"])
    assert {"complete", "run_keys_bytes_per_accepted_order", "used_bytes_per_accepted_order",
            "breakdown"} <= set(per_order["after_expiry"])
    assert {"client_202", "rows", "lost", "oversell", "ledger"} <= set(doc["check"])
    assert doc["chunks"] and {"load", "cores", "accepted_per_s"} <= set(doc["chunks"][0])
    phases = {s["phase"] for s in doc["samples"]}
    assert {"baseline", "load", "drained", "end"} <= phases
    assert {"t_s", "front_rss_mb", "redis_used_mb", "run_keys_mb", "xlen", "pel", "lag",
            "holds", "pending", "idem_keys", "events", "rps"} <= set(doc["samples"][-1])
    md = (tmp_path / "soak.md").read_text()
    assert "## Verdict" in md and "| t s |" in md
