"""The embedded servers are supervised: a killed one comes back by itself.

`flashsale up` runs on embedded servers (real child processes) in one data dir
shared by the tests of this module (one initdb). Each server is SIGKILLed in
turn: it must come back on the same port with its data, and /readyz must
return to 200 without restarting `up`. A server that cannot be restarted makes
`up` exit non-zero with a one-line reason; a port taken by another process
while the server was down is such a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis
from aiohttp import ClientSession, ClientTimeout

from flashsale.run.embedded.servers import EmbeddedServers
from tests.integration.test_cli import (
    EMBEDDED_READY_WITHIN_S,
    Up,
    clean_env,
    processes_mentioning,
    run_cli,
    start_up,
    stop_up,
)

READY_AGAIN_WITHIN_S = 15.0  # kill -> /readyz 200 again (measured: about 1 s)
GIVES_UP_WITHIN_S = 30.0  # kill of an unrestartable server -> `up` exited
# where the embedded servers' passwords are kept in secrets.json
REDIS_PASSWORD_SECRET = "FLASHSALE_EMBEDDED_REDIS_PASSWORD"
POSTGRES_PASSWORD_SECRET = "FLASHSALE_EMBEDDED_POSTGRES_PASSWORD"
_REDIS_TITLE = re.compile(r"redis-server\s+127\.0\.0\.1:(\d+)")
_PG_PORT = re.compile(r"\s-p\s+(\d+)(\s|$)")


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """One FLASHSALE_DATA_DIR (one cluster) for every `up` of this module."""
    path = Path(tempfile.mkdtemp(prefix="flashsale-supervise-")).resolve()
    path.chmod(0o755)
    try:
        yield path
    finally:
        for pid, _ in processes_mentioning(path):  # never leave a server behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(path, ignore_errors=True)


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    return clean_env(
        FLASHSALE_PORT="0",
        FLASHSALE_DATA_DIR=str(data_dir),
        FLASHSALE_LOG_LEVEL="WARNING",
        FLASHSALE_REDIS_APPENDFSYNC="always",  # every acknowledged write survives a kill -9
        **extra,
    )


def _children(pid: int) -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[1]) == pid:
            found.append((int(entry.name), cmd))
    return found


def server_child(up_pid: int, name: str) -> tuple[int, int] | None:
    """(pid, port) of up's embedded ``name`` server ("redis" / "postgres")."""
    for pid, cmd in _children(up_pid):
        if name == "redis" and (m := _REDIS_TITLE.search(cmd)):
            return pid, int(m.group(1))
        if name == "postgres" and " -D " in cmd and (m := _PG_PORT.search(cmd)):
            return pid, int(m.group(1))
    return None


def _secrets(data_dir: Path) -> dict[str, str]:
    stored: dict[str, str] = json.loads((data_dir / "secrets.json").read_text())
    return stored


async def _readyz(url: str) -> int:
    try:
        async with ClientSession(timeout=ClientTimeout(total=2)) as s, s.get(url + "/readyz") as r:
            return r.status
    except (TimeoutError, OSError):
        return 0


async def kill_and_see_it_back(up: Up, name: str) -> tuple[int, int, int, float]:
    """SIGKILL up's ``name`` server; wait for another process of it and /readyz
    200. Returns (old pid, new pid, port, seconds from the kill to ready)."""
    found = server_child(up.proc.pid, name)
    assert found, f"no embedded {name} under `up`: {_children(up.proc.pid)}"
    old_pid, _ = found
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    deadline = killed_at + READY_AGAIN_WITHIN_S
    while True:
        assert up.proc.poll() is None, f"`up` exited ({up.proc.returncode}):\n{up.output()}"
        now = server_child(up.proc.pid, name)
        if now and now[0] != old_pid and await _readyz(up.url) == 200:
            took = time.monotonic() - killed_at
            return old_pid, now[0], now[1], took
        assert time.monotonic() < deadline, (
            f"{name} not back with /readyz 200 within {READY_AGAIN_WITHIN_S}s of kill -9 "
            f"(now: {now}, /readyz {await _readyz(up.url)})\n{up.output()[-3000:]}"
        )
        await asyncio.sleep(0.1)


async def sale_with_a_held_order(up: Up, env: dict[str, str]) -> tuple[str, str]:
    """(sale_id, order_id): a new sale of 3 and one order of a new buyer,
    persisted and awaiting payment (use_the_service's buyer is used only once
    per data dir: its idempotency key would be reused)."""
    buyer = "buyer" + secrets.token_hex(4)
    token = run_cli(["token", buyer], env).stdout.strip()
    admin = {"Authorization": f"Bearer {up.admin_token}"}
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "first"}
    async with ClientSession(timeout=ClientTimeout(total=10)) as s:
        body = {"sku": "SUP", "name": "supervised", "price_cents": 500, "stock": 3}
        async with s.post(up.url + "/api/v1/sales", headers=admin, json=body) as r:
            sale = await r.json()
            assert r.status == 201, sale
        url = f"{up.url}/api/v1/sales/{sale['sale_id']}/orders"
        async with s.post(url, headers=headers, json={"quantity": 1}) as r:
            order = await r.json()
            assert r.status == 202, order
        deadline = time.monotonic() + 15
        while True:
            async with s.get(f"{up.url}/api/v1/orders/{order['order_id']}", headers=headers) as r:
                seen = await r.json()
                assert r.status == 200, seen
            if seen["status"] == "awaiting_payment":
                return str(sale["sale_id"]), str(order["order_id"])
            assert time.monotonic() < deadline, f"the consumer did not persist {seen}"
            await asyncio.sleep(0.25)


async def _reserve(up: Up, env: dict[str, str], sale_id: str, key: str) -> int:
    token = run_cli(["token", "bob"], env).stdout.strip()
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key}
    url = f"{up.url}/api/v1/sales/{sale_id}/orders"
    async with (
        ClientSession(timeout=ClientTimeout(total=10)) as s,
        s.post(url, headers=headers, json={"quantity": 1}) as r,
    ):
        return r.status


async def test_killed_redis_comes_back_on_its_port_with_its_data(shared_dir: Path) -> None:
    env = _env(shared_dir)
    up = await start_up(env, shared_dir, EMBEDDED_READY_WITHIN_S)
    try:
        sale_id, order_id = await sale_with_a_held_order(up, env)
        old_pid, new_pid, port, took = await kill_and_see_it_back(up, "redis")
        print(f"\n[supervision] redis kill -9 -> /readyz 200 again in {took:.2f}s")
        assert new_pid != old_pid and server_child(up.proc.pid, "redis") == (new_pid, port)

        client = redis.Redis(
            host="127.0.0.1", port=port, password=_secrets(shared_dir).get(REDIS_PASSWORD_SECRET)
        )
        try:  # the reservation came back from the AOF
            assert client.hexists(f"fs:{{{sale_id}}}:holds", order_id)
            assert client.hget(f"fs:{{{sale_id}}}:sale", "available") == b"2"
        finally:
            client.close()
        assert await _reserve(up, env, sale_id, "after-redis-restart") == 202
    finally:
        code, _ = stop_up(up)
    assert code == 0, up.output()
    assert "Traceback" not in up.output()


async def test_killed_postgres_comes_back_on_its_port_with_its_data(shared_dir: Path) -> None:
    env = _env(shared_dir)
    up = await start_up(env, shared_dir, EMBEDDED_READY_WITHIN_S)
    try:
        sale_id, order_id = await sale_with_a_held_order(up, env)
        old_pid, new_pid, port, took = await kill_and_see_it_back(up, "postgres")
        print(f"\n[supervision] postgres kill -9 -> /readyz 200 again in {took:.2f}s")
        assert new_pid != old_pid and server_child(up.proc.pid, "postgres") == (new_pid, port)

        password = _secrets(shared_dir).get(POSTGRES_PASSWORD_SECRET)
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user="flashsale", password=password,
            database="flashsale",
        )  # fmt: skip
        try:  # the persisted order survived the crash
            status = await conn.fetchval("SELECT status FROM orders WHERE order_id = $1", order_id)
            assert status == "awaiting_payment"
        finally:
            await conn.close()
        assert await _reserve(up, env, sale_id, "after-pg-restart") == 202
    finally:
        code, _ = stop_up(up)
    assert code == 0, up.output()
    assert "Traceback" not in up.output()


async def test_up_exits_with_a_one_line_reason_when_redis_cannot_restart(
    shared_dir: Path,
) -> None:
    env = _env(shared_dir, FLASHSALE_EMBEDDED_RESTART_MAX="3")
    up = await start_up(env, shared_dir, EMBEDDED_READY_WITHIN_S)
    redis_dir, kept = shared_dir / "redis", shared_dir / "redis.kept"
    try:
        found = server_child(up.proc.pid, "redis")
        assert found
        redis_dir.rename(kept)  # the data dir becomes unusable: "redis" is a file now
        redis_dir.write_text("not a directory\n")
        os.kill(found[0], signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            code = up.proc.wait(timeout=GIVES_UP_WITHIN_S)
            print(f"\n[supervision] unrestartable redis: `up` exited {code} "
                  f"{time.monotonic() - killed_at:.2f}s after the kill")
        except Exception:
            raise AssertionError(
                f"`up` still running {GIVES_UP_WITHIN_S}s after its Redis could not "
                f"restart:\n{up.output()[-3000:]}"
            ) from None
    finally:
        if up.proc.poll() is None:
            stop_up(up)
        if kept.exists():
            redis_dir.unlink(missing_ok=True)
            kept.rename(redis_dir)
    stderr = up.err_path.read_text(errors="replace")
    assert code == 1, up.output()
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("flashsale: embedded redis"), stderr
    assert "could not be restarted" in last and "3 attempts" in last, last
    assert processes_mentioning(shared_dir) == [], "a server outlived `up`"


def _grab(port: int, until: float) -> socket.socket | None:
    """Listen on ``port`` as soon as it is free (before the supervisor can)."""
    while time.monotonic() < until:
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            return sock
        except OSError:
            sock.close()
    return None


@pytest.fixture
def own_dir() -> Iterator[Path]:
    """A data dir right under the system temp dir: pytest's own tmp_path parent
    is made 0700 again by any pytest session starting meanwhile, which would
    lock out the servers' unprivileged user (under root)."""
    path = Path(tempfile.mkdtemp(prefix="flashsale-port-")).resolve()
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_port_taken_while_redis_was_down_is_a_one_line_failure(own_dir: Path) -> None:
    from flashsale.run.embedded.servers import RestartPolicy

    reasons: list[str] = []
    called = threading.Event()
    servers = EmbeddedServers(
        own_dir / "data", postgres=False, restart=RestartPolicy(max_restarts=2)
    )
    servers.start()
    holder = None
    try:
        def failed(reason: str) -> None:
            reasons.append(reason)
            called.set()

        servers.add_failure_listener(failed)
        port = servers.redis_port
        for _ in range(3):  # the supervisor may win the race for the port: kill again
            pid = servers.redis_pid
            assert pid and port
            os.kill(pid, signal.SIGKILL)
            holder = _grab(port, time.monotonic() + 2.0)
            if holder is not None:
                break
        assert holder is not None, "could not take the port from the restarting Redis"
        assert called.wait(GIVES_UP_WITHIN_S), "the supervisor never gave up"
    finally:
        servers.stop()
        if holder is not None:
            holder.close()
    (reason,) = reasons
    assert reason == servers.failure
    assert "\n" not in reason
    assert f"port {port} is taken" in reason and "could not be restarted" in reason, reason
