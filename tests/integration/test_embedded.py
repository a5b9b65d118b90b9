"""EmbeddedServers starts real redis-server and postgres children and never leaks them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from flashsale.run.embedded.servers import EmbeddedServers

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def own_dir() -> Iterator[Path]:
    """A fresh directory right under the system temp dir, searchable by all:
    under root the servers run as an unprivileged user, and pytest's tmp_path
    parent (/tmp/pytest-of-root) is made 0700 again by any pytest session that
    starts meanwhile."""
    path = Path(tempfile.mkdtemp(prefix="flashsale-embedded-")).resolve()
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie awaiting its reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_dead(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


async def _pg_roundtrip(url: str, value: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS probe (v text NOT NULL)")
        await conn.execute("INSERT INTO probe (v) VALUES ($1)", value)
        rows = await conn.fetch("SELECT v FROM probe ORDER BY v")
        return [str(r["v"]) for r in rows]
    finally:
        await conn.close()


async def _pg_values(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        return [str(r["v"]) for r in await conn.fetch("SELECT v FROM probe ORDER BY v")]
    finally:
        await conn.close()


def test_start_use_stop_and_reuse_data(own_dir: Path) -> None:
    data_dir = own_dir / "data"
    servers = EmbeddedServers(data_dir)
    servers.start()
    try:
        assert servers.redis_url and servers.database_url
        assert re.fullmatch(r"redis://:[A-Za-z0-9_-]{16,}@127\.0\.0\.1:\d+/0", servers.redis_url)
        assert re.fullmatch(
            r"postgresql://flashsale:[A-Za-z0-9_-]{16,}@127\.0\.0\.1:\d+/flashsale",
            servers.database_url,
        )
        assert "***" in repr(servers) and servers.redis_url not in repr(servers)
        pids = [p for p in (servers.redis_pid, servers.postgres_pid) if p is not None]
        assert len(pids) == 2 and all(_alive(p) for p in pids)

        client = redis.Redis.from_url(servers.redis_url)
        assert client.set("probe", "one")
        assert client.get("probe") == b"one"
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("save") == {"save": ""}
        client.close()

        assert asyncio.run(_pg_roundtrip(servers.database_url, "one")) == ["one"]
    finally:
        servers.stop()

    assert servers.redis_url is None and servers.database_url is None
    assert _wait_dead(pids, 1.0) == []
    servers.stop()  # idempotent
    assert (data_dir / "redis.log").stat().st_size > 0
    assert (data_dir / "postgres" / "PG_VERSION").exists()

    # A second start reuses the same cluster and AOF: the data is still there.
    with EmbeddedServers(data_dir) as again:
        assert again.redis_url and again.database_url
        client = redis.Redis.from_url(again.redis_url)
        assert client.get("probe") == b"one"
        client.close()
        assert asyncio.run(_pg_roundtrip(again.database_url, "two")) == ["one", "two"]


_CHILD_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from pathlib import Path

    import asyncpg, redis

    from flashsale.run.embedded.servers import EmbeddedServers

    servers = EmbeddedServers(Path(sys.argv[1]), appendfsync="always")
    servers.start()
    redis.Redis.from_url(servers.redis_url).set("survivor", "yes")

    async def write() -> None:
        conn = await asyncpg.connect(servers.database_url)
        await conn.execute("CREATE TABLE probe (v text NOT NULL)")
        await conn.execute("INSERT INTO probe (v) VALUES ('committed')")
        await conn.close()

    asyncio.run(write())
    Path(sys.argv[2]).write_text(json.dumps([servers.redis_pid, servers.postgres_pid]))
    time.sleep(600)
    """
)


def _start_child(data_dir: Path, pid_file: Path) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    for name in ("FLASHSALE_REDIS_URL", "FLASHSALE_DATABASE_URL"):
        env.pop(name, None)
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD_SCRIPT, str(data_dir), str(pid_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _read_pids(proc: subprocess.Popen[bytes], pid_file: Path, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while not pid_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            output = proc.communicate()[0].decode(errors="replace")
            raise AssertionError(f"child did not start the servers:\n{output}")
        time.sleep(0.05)
    pids: list[int] = json.loads(pid_file.read_text())
    return pids


def test_servers_die_with_sigkilled_parent(own_dir: Path) -> None:
    data_dir = own_dir / "data"
    pid_file = own_dir / "pids.json"
    proc = _start_child(data_dir, pid_file)
    pids = _read_pids(proc, pid_file, 120.0)
    assert len(pids) == 2 and all(_alive(p) for p in pids)

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert _wait_dead(pids, 5.0) == [], "server processes outlived their SIGKILLed parent"

    # After the crash the same data dir starts again (stale lock files handled)
    # and keeps what was acknowledged before the kill.
    with EmbeddedServers(data_dir) as again:
        assert again.redis_url and again.database_url
        client = redis.Redis.from_url(again.redis_url)
        assert client.get("survivor") == b"yes"
        client.close()
        assert asyncio.run(_pg_values(again.database_url)) == ["committed"]


# -- passwords ------------------------------------------------------------------

REDIS_PASSWORD_SECRET = "FLASHSALE_EMBEDDED_REDIS_PASSWORD"
POSTGRES_PASSWORD_SECRET = "FLASHSALE_EMBEDDED_POSTGRES_PASSWORD"
LEGACY_TRUST_HBA = """# as `initdb --auth=trust` wrote it for clusters made before passwords
local   all             all                                     trust
host    all             all             127.0.0.1/32            trust
host    all             all             ::1/128                 trust
local   replication     all                                     trust
host    replication     all             127.0.0.1/32            trust
host    replication     all             ::1/128                 trust
"""


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """One data dir (one initdb) for the password tests."""
    path = Path(tempfile.mkdtemp(prefix="flashsale-embedded-")).resolve()
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _raw_redis(port: int, *commands: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"".join(commands))
        return sock.recv(4096)


def test_embedded_redis_requires_its_password(shared_dir: Path) -> None:
    with EmbeddedServers(shared_dir, postgres=False) as servers:
        port, pid = servers.redis_port, servers.redis_pid
        assert port and pid and servers.redis_url
        set_stock = b"*3\r\n$3\r\nSET\r\n$8\r\nfs:stock\r\n$1\r\n0\r\n"
        assert _raw_redis(port, set_stock).startswith(b"-NOAUTH"), "no password needed"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, password="not-the-password").ping()
        client = redis.Redis.from_url(servers.redis_url)
        try:
            assert client.ping()
        finally:
            client.close()
        stored = json.loads((shared_dir / "secrets.json").read_text())
        assert f":{stored[REDIS_PASSWORD_SECRET]}@" in servers.redis_url
        assert stat.S_IMODE((shared_dir / "secrets.json").stat().st_mode) == 0o600
        conf = shared_dir / "redis" / "redis.conf"  # the password, readable by its owner only
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert stored[REDIS_PASSWORD_SECRET] not in cmdline


async def _pg_login(**kw: Any) -> None:
    conn = await asyncpg.connect(user="flashsale", database="flashsale", timeout=5, **kw)
    await conn.close()


def _pg_refused(**kw: Any) -> bool:
    try:
        asyncio.run(_pg_login(**kw))
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
        return True
    return False


def test_embedded_postgres_requires_its_password(shared_dir: Path) -> None:
    with EmbeddedServers(shared_dir, redis=False) as servers:
        port, url = servers.postgres_port, servers.database_url
        assert port and url
        assert _pg_refused(host="127.0.0.1", port=port), "TCP login without a password"
        assert _pg_refused(host="127.0.0.1", port=port, password="not-the-password")
        assert _pg_refused(host=str(shared_dir / "run"), port=port), "Unix socket, no password"
        asyncio.run(_pg_login(dsn=url))
        stored = json.loads((shared_dir / "secrets.json").read_text())
        assert f":{stored[POSTGRES_PASSWORD_SECRET]}@" in url
    hba = (shared_dir / "postgres" / "pg_hba.conf").read_text()
    rules = [line.split() for line in hba.splitlines() if line and not line.startswith("#")]
    assert rules and all(rule[-1] == "scram-sha-256" for rule in rules), hba


async def _drop_password(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("ALTER ROLE flashsale PASSWORD NULL")
    finally:
        await conn.close()


def test_a_cluster_made_without_a_password_gets_one(shared_dir: Path) -> None:
    """A data dir from before passwords (trust rules, no password for the role,
    none in secrets.json) keeps working, and is password-protected from then on."""
    with EmbeddedServers(shared_dir, redis=False) as servers:
        assert servers.database_url
        asyncio.run(_drop_password(servers.database_url))
    hba = shared_dir / "postgres" / "pg_hba.conf"
    owner = hba.stat()
    hba.write_text(LEGACY_TRUST_HBA)
    os.chown(hba, owner.st_uid, owner.st_gid)
    secrets_file = shared_dir / "secrets.json"
    stored = json.loads(secrets_file.read_text())
    stored.pop(POSTGRES_PASSWORD_SECRET, None)
    secrets_file.write_text(json.dumps(stored))

    with EmbeddedServers(shared_dir, redis=False) as servers:
        port, url = servers.postgres_port, servers.database_url
        assert port and url
        assert _pg_refused(host="127.0.0.1", port=port), "still trusted after the upgrade"
        asyncio.run(_pg_login(dsn=url))
        new_password = json.loads(secrets_file.read_text())[POSTGRES_PASSWORD_SECRET]
        assert f":{new_password}@" in url
    # and the next start is an ordinary one
    with EmbeddedServers(shared_dir, redis=False) as servers:
        assert servers.database_url and servers.postgres_port
        asyncio.run(_pg_login(dsn=servers.database_url))
        assert _pg_refused(host="127.0.0.1", port=servers.postgres_port)
