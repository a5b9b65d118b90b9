"""/readyz follows Redis: a real redis-server child is killed and restarted.

The app runs against its own redis-server (a child process on a free port)
and the test database. Killing the server must turn /readyz into 503 with the
failing check while /healthz stays 200 and reservations answer 503
``unavailable`` with Retry-After (never 500); restarting it on the same port
must bring /readyz back to 200 with the Lua scripts loaded again.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from flashsale.config import Settings
from flashsale.core.scripts import SCRIPT_FILES
from tests import support
from tests.support import Api, eventually, fresh_database, running_app

READY_WITHIN_S = 5.0


def _redis_binary() -> str:
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(found, os.X_OK):
        from flashsale.run.embedded.servers import find_redis_server

        return str(find_redis_server())
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisChild:
    """One redis-server child process on a fixed port, restartable."""

    def __init__(self, data_dir: Path, *, persistent: bool) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        assert self.proc is None
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else [
            "--appendonly", "no"
        ]
        log = (self.data_dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [_redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.data_dir), "--save", "", "--daemonize", "no", *aof],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "redis-server did not start:\n"
                        + (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def _redis_child(tmp_path: Path, persistent: bool) -> Iterator[RedisChild]:
    child = RedisChild(tmp_path, persistent=persistent)
    child.start()
    try:
        yield child
    finally:
        child.stop()


@pytest.fixture
def redis_child(tmp_path: Path) -> Iterator[RedisChild]:
    """A redis-server that keeps its data across a restart (AOF, fsync always)."""
    yield from _redis_child(tmp_path, persistent=True)


@pytest.fixture
def volatile_redis_child(tmp_path: Path) -> Iterator[RedisChild]:
    """A redis-server that comes back empty after a restart."""
    yield from _redis_child(tmp_path, persistent=False)


def _settings(child: RedisChild, database_url: str) -> Settings:
    # a short socket timeout so a dead server is noticed quickly
    return support.test_settings(child.url, database_url, redis_timeout_s=1.0)


@pytest.fixture
async def api_on_child(redis_child: RedisChild, database_url: str) -> AsyncIterator[Api]:
    async with running_app(_settings(redis_child, database_url)) as api:
        yield api


async def _readyz(api: Api) -> tuple[int, Any, dict[str, str]]:
    status, body, resp = await api.request("GET", "/readyz")
    return status, body, dict(resp.headers)


async def _wait_ready(api: Api, want: int, timeout_s: float = READY_WITHIN_S) -> Any:
    async def check() -> Any:
        status, body, _ = await _readyz(api)
        return body if status == want else None

    return await eventually(check, timeout_s=timeout_s, interval_s=0.1)


async def test_readyz_follows_redis_down_and_back(
    api_on_child: Api, redis_child: RedisChild
) -> None:
    api = api_on_child
    status, body, _ = await _readyz(api)
    assert status == 200, body
    assert body == {"status": "ok", "checks": {"redis": "ok", "postgres": "ok", "scripts": "ok"}}
    sale = await api.create_sale(stock=5, per_user_limit=5)
    sid = sale["sale_id"]
    assert (await api.reserve(sid, "before", 1, key="b-1"))[0] == 202

    redis_child.kill()
    started = time.monotonic()
    down = await _wait_ready(api, 503)
    went_down_s = time.monotonic() - started
    assert went_down_s < READY_WITHIN_S
    assert down["status"] == "unavailable"
    assert set(down["checks"]) == {"redis", "postgres", "scripts"}
    assert down["checks"]["redis"].startswith("error"), down
    assert down["checks"]["postgres"] == "ok", down
    status, _, headers = await _readyz(api)
    assert status == 503 and headers["Content-Type"].startswith("application/json")

    status, health, _ = await api.request("GET", "/healthz")
    assert (status, health) == (200, {"status": "ok"})

    # a reservation while Redis is down: 503 unavailable with Retry-After, never 500
    for key in ("down-1", None):
        t0 = time.monotonic()
        status, body = await api.reserve(sid, "during", 1, key=key)
        assert (status, body["error"]["code"]) == (503, "unavailable"), body
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
        assert time.monotonic() - t0 < 10
    headers = {**api.buyer("during"), "Idempotency-Key": "down-2"}
    status, body, resp = await api.request(
        "POST", f"/api/v1/sales/{sid}/orders", json={"quantity": 1}, headers=headers
    )
    assert status == 503 and int(resp.headers["Retry-After"]) >= 1
    # a sale read degrades to PostgreSQL's figures (or 503), never a 500
    status, body, _ = await api.request("GET", f"/api/v1/sales/{sid}")
    if status == 200:
        assert body["sale_id"] == sid and body["stock"] == 5
    else:
        assert (status, body["error"]["code"]) == (503, "unavailable"), body

    redis_child.start()  # same port, same AOF: the sale is back, the script cache is empty
    back = await _wait_ready(api, 200, timeout_s=10.0)
    assert back == {"status": "ok", "checks": {"redis": "ok", "postgres": "ok", "scripts": "ok"}}
    shas = [getattr(api.backends.scripts, name).sha for name in SCRIPT_FILES]
    probe = redis.Redis.from_url(redis_child.url)
    try:
        assert all(probe.script_exists(*shas)), "readyz did not reload the scripts"
    finally:
        probe.close()

    # the 503s were not remembered under their keys: the retry succeeds now
    status, order = await api.reserve(sid, "during", 1, key="down-1")
    assert status == 202, order
    await api.drain(sid)
    led = await api.ledger(sid)
    assert led["consistent"] is True
    assert led["available"] == 3 and led["awaiting_payment"] == 2, led


async def test_readyz_reports_postgres_when_migrations_are_missing(
    redis_child: RedisChild, server_urls: tuple[str, str]
) -> None:
    """An empty (unmigrated) database: 503 with the postgres check failing."""
    unmigrated = fresh_database(server_urls[1], "flashsale_unmigrated", migrated=False)
    async with unmigrated as dsn, running_app(_settings(redis_child, dsn)) as api:
        status, body, _ = await _readyz(api)
        assert status == 503, body
        assert body["status"] == "unavailable"
        assert body["checks"]["redis"] == "ok" and body["checks"]["scripts"] == "ok"
        assert body["checks"]["postgres"].startswith("error"), body


async def test_redis_back_empty_rebuilds_the_sale_from_postgres(
    volatile_redis_child: RedisChild, database_url: str
) -> None:
    """Redis returns without its data: readiness recovers, and the sale is
    rebuilt from PostgreSQL (503 meanwhile, never 404 or 500)."""
    child = volatile_redis_child
    async with running_app(_settings(child, database_url)) as api:
        sid = (await api.create_sale(stock=4, per_user_limit=4))["sale_id"]
        assert (await api.reserve(sid, "early", 2, key="e-1"))[0] == 202
        await api.drain(sid)  # persisted: PostgreSQL knows about these 2

        child.kill()
        await _wait_ready(api, 503)
        child.start()
        await _wait_ready(api, 200, timeout_s=10.0)

        async def reserve_once() -> Any:
            status, body = await api.reserve(sid, "late", 1, key="l-1")
            assert status in (202, 503), (status, body)
            if status == 503:
                assert body["error"]["code"] == "unavailable"
                return None
            return body

        order = await eventually(reserve_once, timeout_s=10.0, interval_s=0.1)
        assert order["quantity"] == 1
        await api.drain(sid)
        led = await api.ledger(sid)
        assert led["consistent"] is True, led
        assert led["available"] == 1 and led["awaiting_payment"] == 3, led
