"""EmbeddedServers starts real redis-server and postgres children and never leaks them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import asyncpg
import redis

from flashsale.embedded import EmbeddedServers

REPO = Path(__file__).resolve().parents[2]


def _searchable(path: Path) -> Path:
    """Let the unprivileged server user (used under root) reach ``path``.

    pytest makes its temp dirs 0700; add o+x up to the system temp dir.
    """
    if os.geteuid() == 0:
        top = Path(tempfile.gettempdir()).resolve()
        for directory in (path, *path.parents):
            if directory == top or top not in directory.parents:
                break
            mode = stat.S_IMODE(directory.stat().st_mode)
            directory.chmod(mode | stat.S_IXOTH)
    return path


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


def test_start_use_stop_and_reuse_data(tmp_path: Path) -> None:
    data_dir = _searchable(tmp_path) / "data"
    servers = EmbeddedServers(data_dir)
    servers.start()
    try:
        assert servers.redis_url and servers.database_url
        assert servers.redis_url.startswith("redis://127.0.0.1:")
        assert servers.database_url.endswith("/flashsale")
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

    from flashsale.embedded import EmbeddedServers

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


def test_servers_die_with_sigkilled_parent(tmp_path: Path) -> None:
    data_dir = _searchable(tmp_path) / "data"
    pid_file = tmp_path / "pids.json"
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
