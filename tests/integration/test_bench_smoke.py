"""Smoke run of the bench code (`python -m bench.run --quick`): seconds, no figures asserted.

It checks that one quick pass over every system writes the three result files
and that latest.json has the keys the issue asks for. Against the test run's
servers when the suite has them, else the bench starts its own. The load
generator is wrk when installed, else the built-in Python client; a second
pass forces the Python client so that path is exercised too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def _assert_written(out: Path, proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
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
    assert "| system |" in (tmp_path / "latest.md").read_text()


def test_quick_bench_python_load_generator(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    proc = _bench(_server_env(request), tmp_path, "--loadgen", "python", "--systems", "echo")
    doc = _assert_written(tmp_path, proc)
    assert doc["meta"]["loadgen"] == "python"  # type: ignore[index]
