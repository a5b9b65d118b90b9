"""Worker metrics endpoints, the CLI's status and reconcile --all, and the
names the alert rules and the Grafana dashboard use (issue 15), with real
`flashsale consume` / `flashsale compensate` processes on real servers."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from aiohttp import ClientSession, ClientTimeout

from flashsale.config import ConfigError, Settings
from flashsale.core import live_sales
from flashsale.ops import status
from tests.integration.test_cli import clean_env, flashsale_cmd, run_cli
from tests.support import Api, eventually, fresh_database, running_app, test_settings

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"
NAME_RE = re.compile(r"\bflashsale_[a-z0-9_]+\b")
PROMETHEUS_MADE = {"up"}  # the rules may use series Prometheus itself makes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    assert settings.redis_url and settings.database_url
    return clean_env(
        FLASHSALE_REDIS_URL=settings.redis_url, FLASHSALE_DATABASE_URL=settings.database_url,
        FLASHSALE_KEY_PREFIX=settings.key_prefix, FLASHSALE_ADMIN_TOKEN=settings.admin_token,
        FLASHSALE_JWT_SECRET=settings.jwt_secret,
        FLASHSALE_WEBHOOK_SECRET=settings.webhook_secret, FLASHSALE_LOG_LEVEL="WARNING",
        **extra,
    )


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    url: str


@contextmanager
def worker(cmd: str, settings: Settings, port_var: str) -> Iterator[Worker]:
    port = free_port()
    proc = subprocess.Popen(
        [*flashsale_cmd(), cmd], env=env_for(settings, **{port_var: str(port)}), cwd=REPO,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        yield Worker(proc, f"http://127.0.0.1:{port}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def get(session: ClientSession, url: str) -> tuple[int, str]:
    try:
        async with session.get(url, timeout=ClientTimeout(total=3)) as r:
            return r.status, await r.text()
    except OSError:
        return 0, ""


@pytest.fixture
async def own_db(server_urls: tuple[str, str]) -> AsyncIterator[Settings]:
    """A database of this test's own: the worker processes sweep every sale in it."""
    async with fresh_database(server_urls[1], "flashsale_obs") as dsn:
        yield test_settings(server_urls[0], dsn)


def exported(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def referenced() -> dict[str, set[str]]:
    dash = json.loads((PROM / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    rules_text = "\n".join(
        line for line in (PROM / "rules.yml").read_text().splitlines()
        if not line.lstrip().startswith("#")
    )
    rule_exprs = re.findall(r"expr: (?:>\n)?((?:.|\n)*?)\n\s+(?:for|labels):", rules_text)
    return {
        "rules": {n for e in rule_exprs for n in NAME_RE.findall(e)},
        "dashboard": {n for e in exprs for n in NAME_RE.findall(e)},
    }


async def test_worker_endpoints_and_every_metric_the_rules_and_dashboard_use(
    own_db: Settings,
) -> None:
    settings = own_db
    async with running_app(settings) as api, ClientSession() as http:
        sale = await api.create_sale(stock=20, per_user_limit=20, hold_seconds=1)
        sid = sale["sale_id"]
        with worker("consume", settings, "FLASHSALE_CONSUME_METRICS_PORT") as consume, \
                worker("compensate", settings, "FLASHSALE_COMPENSATE_METRICS_PORT") as comp:
            for w in (consume, comp):
                async def healthy(w: Worker = w) -> bool:
                    assert w.proc.poll() is None, w.proc.stderr.read() if w.proc.stderr else ""
                    status, body = await get(http, w.url + "/healthz")
                    return bool(status == 200 and '"ok"' in body)
                await eventually(healthy, timeout_s=30)
            for i in range(5):
                assert (await api.reserve(sid, f"b{i}", quantity=2))[0] == 202
            assert (await api.reserve(sid, "b0", quantity=100))[0] == 409

            async def settled() -> bool:  # persisted by consume, then expired by compensate
                led = await api.ledger(sid)
                return bool(led["expired"] == 10 and led["consistent"])
            await eventually(settled, timeout_s=30)

            async def alive() -> bool:  # both heartbeats seen by the front
                _s, text = await get(http, api.base + "/metrics")
                return ('flashsale_workers_alive{role="consumer"} 1.0' in text
                        and 'flashsale_workers_alive{role="compensator"} 1.0' in text)
            await eventually(alive, timeout_s=15)

            texts = {}
            for name, url in (("front", api.base), ("consume", consume.url),
                              ("compensate", comp.url)):
                status, texts[name] = await get(http, url + "/metrics")
                assert status == 200, name
            assert 'flashsale_worker_up{role="consumer"} 1.0' in texts["consume"]
            assert 'flashsale_worker_up{role="compensator"} 1.0' in texts["compensate"]
            assert "flashsale_orders_persisted_total 5.0" in texts["consume"]
            assert 'flashsale_releases_total{reason="expired"} 5.0' in texts["compensate"]
            assert f'flashsale_sale_units{{figure="expired",sale_id="{sid}"}} 10.0' \
                in texts["front"]
            assert f'flashsale_sale_ledger_consistent{{sale_id="{sid}"}} 1.0' in texts["front"]
            assert 'flashsale_backend_ready{backend="redis"} 1.0' in texts["front"]
        # stopped: the heartbeats are removed at once
        async def gone() -> bool:
            _s, text = await get(http, api.base + "/metrics")
            return 'flashsale_workers_alive{role="compensator"} 0.0' in text
        await eventually(gone, timeout_s=10)

    names = set().union(*(exported(t) for t in texts.values()))
    used = referenced()
    assert len(used["rules"]) >= 8 and len(used["dashboard"]) >= 10, used
    for what, wanted in used.items():
        missing = wanted - names - PROMETHEUS_MADE
        assert not missing, f"{what} use metrics the service does not export: {missing}"
    for n in names:  # Prometheus naming: counters _total, durations _seconds
        assert not n.endswith("_ms") and not n.endswith("_milliseconds"), n


def test_worker_metrics_off_unless_configured() -> None:
    s = Settings.from_env({})
    assert s.consume_metrics_port is None and s.compensate_metrics_port is None
    s = Settings.from_env({"FLASHSALE_METRICS_PORT": "9100"})
    assert s.consume_metrics_port == s.compensate_metrics_port == 9100
    s = Settings.from_env({"FLASHSALE_METRICS_PORT": "9100",
                           "FLASHSALE_CONSUME_METRICS_PORT": "9101"})
    assert (s.consume_metrics_port, s.compensate_metrics_port) == (9101, 9100)
    for var, bad in (("FLASHSALE_LOG_FORMAT", "xml"), ("FLASHSALE_ACCESS_LOG", "yes"),
                     ("FLASHSALE_CONSUME_METRICS_PORT", "70000"),
                     ("FLASHSALE_ADMIN_EVENTS_INTERVAL_MS", "5000"),
                     ("FLASHSALE_LIVE_SALES_MAX", "0")):
        with pytest.raises(ConfigError, match=var):
            Settings.from_env({var: bad})
    assert Settings.from_env({"FLASHSALE_ACCESS_LOG": "0"}).access_log is False


def test_promtool_checks_and_fires_every_rule() -> None:
    assert shutil.which("promtool"), "no promtool: make test installs it (scripts/ensure-tools.sh)"
    check = subprocess.run(["promtool", "check", "rules", str(PROM / "rules.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    tested = subprocess.run(["promtool", "test", "rules", "rules_test.yml"], cwd=PROM,
                            capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = set(re.findall(r"- alert: (\w+)", (PROM / "rules.yml").read_text()))
    fired = set(re.findall(r"alertname: (\w+)", (PROM / "rules_test.yml").read_text()))
    assert alerts <= fired, alerts - fired


async def test_status_and_reconcile_all(own_db: Settings) -> None:
    async with running_app(own_db) as api:  # only this test's sales are live in its database
        await _status_and_reconcile_all(api, env_for(own_db))


async def _status_and_reconcile_all(api: Api, env: dict[str, str]) -> None:
    a = await api.create_sale(stock=30, per_user_limit=5)
    b = await api.create_sale(stock=5)
    for i in range(4):
        assert (await api.reserve(a["sale_id"], f"s{i}", quantity=2))[0] == 202
    await api.drain(a["sale_id"])
    assert (await api.reserve(a["sale_id"], "s9", quantity=1))[0] == 202
    out = await asyncio.to_thread(run_cli, ["status"], env)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith(a["sale_id"]))
    cells = row.split()
    # sale status stock available pending awaiting paid shipped expired cancelled failed ...
    assert cells[1:7] == ["active", "30", "21", "1", "8", "0"], row
    assert cells[-1] == "ok"
    assert any(line.startswith(b["sale_id"]) for line in out.stdout.splitlines())
    assert "workers:" in out.stdout

    ok = await asyncio.to_thread(run_cli, ["reconcile", "--all"], env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "2 live sale(s) checked, 0 inconsistent" in ok.stdout
    assert "2/2 sales" in ok.stderr  # the progress bar
    await api.backends.redis.hincrby(api.backends.keys(b["sale_id"]).sale, "available", 3)
    bad = await asyncio.to_thread(run_cli, ["reconcile", "--all"], env)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"INCONSISTENT {b['sale_id']}" in bad.stdout
    assert a["sale_id"] not in bad.stdout
    usage = await asyncio.to_thread(run_cli, ["reconcile"], env)
    assert usage.returncode == 2 and "--all" in usage.stderr

    watch = await asyncio.to_thread(
        subprocess.Popen, [*flashsale_cmd(), "status", "--watch", "--interval", "0.3"],
        env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        await asyncio.sleep(3)
    finally:
        watch.send_signal(signal.SIGINT)
        stdout, _ = await asyncio.to_thread(watch.communicate, timeout=15)
    assert watch.returncode == 0
    assert stdout.decode().count("workers:") >= 3  # redrawn


async def test_reconcile_all_pages_through_every_live_sale(own_db: Settings) -> None:
    """More live sales than the dashboard shows (live_sales_max) and than a
    page holds: every one is checked, the oldest included."""
    shown_max, page, n = 2, 3, 8
    async with running_app(replace(own_db, live_sales_max=shown_max)) as api:
        made = [(await api.create_sale(stock=4))["sale_id"] for _ in range(n)]
        oldest = made[0]
        b = api.backends
        await b.redis.hincrby(b.keys(oldest).sale, "available", 1)  # its ledger disagrees
        out, bar = io.StringIO(), io.StringIO()
        code = await status.reconcile_all(b, out, bar, page_size=page)
        print(f"\n{out.getvalue().strip()}")
        assert code == 1, out.getvalue()
        assert f"{n} live sale(s) checked, 1 inconsistent" in out.getvalue()
        assert f"INCONSISTENT {oldest}" in out.getvalue()
        assert f"{n}/{n} sales" in bar.getvalue()
        pages = [p async for p in live_sales.pages(b, page)]
    assert [len(p) for p in pages] == [3, 3, 2]
    assert sorted(s for p in pages for s in p) == sorted(made)  # each once
    assert pages[0][0] == made[-1]  # newest first
