"""The `flashsale` command line, run as a real subprocess.

`up` is started as a user would start it (with the machine's servers, and
with embedded ones under a fresh FLASHSALE_DATA_DIR), is used over HTTP, is
stopped with SIGINT and must leave no process behind. The other subcommands
are run for their output and exit codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import orjson
import pytest
from aiohttp import ClientSession, ClientTimeout

from tests.support import fresh_database, with_database

REPO = Path(__file__).resolve().parents[2]
ANNOUNCE = re.compile(r"flashsale is up at (http://\S+)")
ADMIN_LINE = re.compile(r"^admin token:\s+(\S+)\s*$", re.MULTILINE)
SUBCOMMANDS = ("up", "serve", "consume", "compensate", "migrate", "token", "reconcile", "status")
STOP_WITHIN_S = 10.0
EMBEDDED_READY_WITHIN_S = 120.0
GIVEN_READY_WITHIN_S = 30.0


def flashsale_cmd() -> list[str]:
    script = REPO / ".venv" / "bin" / "flashsale"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "flashsale"]


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any FLASHSALE_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(args: list[str], env: Mapping[str, str], timeout_s: float = 60.0
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*flashsale_cmd(), *args], env=dict(env), cwd=REPO, capture_output=True, text=True,
        timeout=timeout_s, stdin=subprocess.DEVNULL,
    )


# -- processes -----------------------------------------------------------------


def _proc_entries() -> Iterator[tuple[int, str, int]]:
    """(pid, cmdline + " cwd=" + working directory, ppid) of every live,
    non-zombie process. The working directory matters: redis-server rewrites
    its cmdline to "redis-server host:port", but runs in the data dir."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                "utf-8", "replace"
            )
        except OSError:
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            cwd = ""
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            continue
        yield int(entry.name), f"{cmdline} cwd={cwd}", int(fields[1])


def processes_mentioning(path: Path, exclude: set[int] | None = None) -> list[tuple[int, str]]:
    """Processes whose command line or working directory names ``path``."""
    skip = {os.getpid(), *(exclude or set())}
    return [(pid, cmd) for pid, cmd, _ in _proc_entries() if str(path) in cmd and pid not in skip]


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, _, ppid in _proc_entries():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_all_dead(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh FLASHSALE_DATA_DIR the embedded servers' unprivileged user can reach
    (mkdtemp under the system temp dir, made traversable)."""
    path = Path(tempfile.mkdtemp(prefix="flashsale-cli-")).resolve()
    path.chmod(0o755)
    try:
        yield path
    finally:
        leftovers = processes_mentioning(path)
        for pid, _ in leftovers:  # never leave a server behind, even on failure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(path, ignore_errors=True)


# -- a running `flashsale up` ------------------------------------------------------


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    url: str
    admin_token: str
    ready_after_s: float

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(
            errors="replace"
        )


def _spawn_up(env: Mapping[str, str], out_path: Path, err_path: Path) -> subprocess.Popen[bytes]:
    with out_path.open("wb") as out, err_path.open("wb") as err:
        return subprocess.Popen(
            [*flashsale_cmd(), "up"], env=dict(env), cwd=REPO, stdout=out, stderr=err,
            stdin=subprocess.DEVNULL,
        )


async def start_up(env: Mapping[str, str], logs: Path, ready_within_s: float) -> Up:
    """Start `flashsale up`; return once it announced its URL and /readyz is 200."""
    out_path, err_path = logs / "up.out", logs / "up.err"
    started = time.monotonic()
    proc = _spawn_up(env, out_path, err_path)
    deadline = started + ready_within_s

    def fail(why: str) -> AssertionError:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        return AssertionError(
            f"{why}\n--- stdout\n{out_path.read_text(errors='replace')}"
            f"\n--- stderr\n{err_path.read_text(errors='replace')[-4000:]}"
        )

    url = None
    while url is None:
        if proc.poll() is not None:
            raise fail(f"`flashsale up` exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise fail("`flashsale up` did not announce its URL in time")
        m = ANNOUNCE.search(out_path.read_text(errors="replace"))
        if m:
            url = m.group(1)
        else:
            await asyncio.sleep(0.05)
    async with ClientSession(timeout=ClientTimeout(total=5)) as session:
        while True:
            try:
                async with session.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None:
                raise fail(f"`flashsale up` exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise fail("/readyz did not answer 200 in time")
            await asyncio.sleep(0.1)
    ready_after_s = time.monotonic() - started
    admin = ADMIN_LINE.search(out_path.read_text(errors="replace"))
    assert admin, out_path.read_text()
    return Up(proc, out_path, err_path, url, admin.group(1), ready_after_s)


def stop_up(up: Up, sig: signal.Signals = signal.SIGINT) -> tuple[int, float]:
    up.proc.send_signal(sig)
    t0 = time.monotonic()
    try:
        code = up.proc.wait(timeout=STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        up.proc.kill()
        up.proc.wait()
        raise AssertionError(
            f"`flashsale up` did not exit within {STOP_WITHIN_S}s of {sig.name}\n{up.output()}"
        ) from None
    return code, time.monotonic() - t0


async def use_the_service(up: Up, env: Mapping[str, str]) -> dict[str, Any]:
    """Create a sale with the announced admin token, reserve with a token from
    `flashsale token`, and see the order persisted by up's consumer."""
    minted = run_cli(["token", "alice"], env)
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "alice" and claims["exp"] > time.time()
    admin = {"Authorization": f"Bearer {up.admin_token}"}
    buyer = {"Authorization": f"Bearer {token}", "Idempotency-Key": "cli-1"}
    async with ClientSession(timeout=ClientTimeout(total=10)) as s:
        async with s.post(
            up.url + "/api/v1/sales", headers=admin,
            json={"sku": "CLI", "name": "cli sale", "price_cents": 700, "stock": 3},
        ) as r:
            sale = await r.json()
            assert r.status == 201, sale
        async with s.post(
            f"{up.url}/api/v1/sales/{sale['sale_id']}/orders", headers=buyer, json={"quantity": 1}
        ) as r:
            order = await r.json()
            assert r.status == 202, order
            assert order["user_id"] == "alice" and order["amount_cents"] == 700
        deadline = time.monotonic() + 15
        while True:
            async with s.get(f"{up.url}/api/v1/orders/{order['order_id']}", headers=buyer) as r:
                seen = await r.json()
                assert r.status == 200, seen
            if seen["status"] == "awaiting_payment":
                break
            assert time.monotonic() < deadline, f"the consumer did not persist {seen}"
            await asyncio.sleep(0.25)  # well under the default per-buyer rate limit
        async with s.get(f"{up.url}/metrics") as r:
            assert r.status == 200
    return {"sale": sale, "order": seen}


# -- tests -------------------------------------------------------------------------


async def test_up_with_given_urls(
    server_urls: tuple[str, str], database_url: str, data_dir: Path
) -> None:
    env = clean_env(
        FLASHSALE_REDIS_URL=server_urls[0],
        FLASHSALE_DATABASE_URL=database_url,
        FLASHSALE_PORT="0",
        FLASHSALE_DATA_DIR=str(data_dir),
        FLASHSALE_KEY_PREFIX="cli" + secrets.token_hex(4),
        FLASHSALE_LOG_LEVEL="WARNING",
    )
    up = await start_up(env, data_dir, GIVEN_READY_WITHIN_S)
    print(f"\n[time to ready] flashsale up with given URLs: {up.ready_after_s:.2f}s")
    try:
        kids_while_running = descendants(up.proc.pid)
        used = await use_the_service(up, env)
        sale_id = used["sale"]["sale_id"]

        rec = run_cli(["reconcile", sale_id], env)
        assert rec.returncode == 0, rec.stdout + rec.stderr
        ledger = orjson.loads(rec.stdout)
        assert ledger["consistent"] is True
        assert (ledger["stock"], ledger["available"], ledger["awaiting_payment"]) == (3, 2, 1)

        missing = run_cli(["reconcile", "sl_000000000000"], env)
        assert missing.returncode != 0 and "Traceback" not in missing.stderr
        assert missing.stderr.strip(), "no message for an unknown sale"
    finally:
        code, took = stop_up(up)
    assert code == 0, up.output()
    assert took < STOP_WITHIN_S
    assert "Traceback" not in up.output()
    assert wait_all_dead(kids_while_running, 5.0) == set()
    assert processes_mentioning(data_dir) == []


async def test_up_with_embedded_servers(data_dir: Path) -> None:
    env = clean_env(
        FLASHSALE_PORT="0", FLASHSALE_DATA_DIR=str(data_dir), FLASHSALE_LOG_LEVEL="WARNING"
    )
    up = await start_up(env, data_dir, EMBEDDED_READY_WITHIN_S)
    print(f"\n[time to ready] flashsale up with embedded servers (fresh data dir, "
          f"initdb included): {up.ready_after_s:.2f}s")
    try:
        servers = processes_mentioning(data_dir, exclude={up.proc.pid})
        names = " ".join(cmd for _, cmd in servers)
        assert "redis-server" in names and "postgres -D" in names, servers
        server_pids = {pid for pid, _ in servers} | descendants(up.proc.pid)
        assert {pid for pid, _ in servers} <= descendants(up.proc.pid), "not up's children"
        await use_the_service(up, env)
        secrets_file = data_dir / "secrets.json"
        assert secrets_file.exists() and secrets_file.stat().st_mode & 0o077 == 0
    finally:
        code, took = stop_up(up)
    assert code == 0, up.output()
    assert took < STOP_WITHIN_S
    assert "Traceback" not in up.output()
    assert wait_all_dead(server_pids, 5.0) == set(), "a server outlived `flashsale up`"
    assert processes_mentioning(data_dir) == []

    # a second start on the same data dir reuses the cluster and the secrets;
    # SIGTERM stops it as SIGINT does
    up2 = await start_up(env, data_dir, EMBEDDED_READY_WITHIN_S)
    print(f"[time to ready] flashsale up with embedded servers (existing data dir): "
          f"{up2.ready_after_s:.2f}s")
    try:
        assert up2.admin_token == up.admin_token
        second_pids = descendants(up2.proc.pid)
        assert second_pids
    finally:
        code, took = stop_up(up2, signal.SIGTERM)
    assert code == 0, up2.output()
    assert took < STOP_WITHIN_S
    assert wait_all_dead(second_pids, 5.0) == set()
    assert processes_mentioning(data_dir) == []


async def test_migrate_twice_is_idempotent(server_urls: tuple[str, str]) -> None:
    async with fresh_database(server_urls[1], "flashsale_cli_migrate", migrated=False) as dsn:
        env = clean_env(FLASHSALE_REDIS_URL=server_urls[0], FLASHSALE_DATABASE_URL=dsn)
        first = run_cli(["migrate"], env)
        assert first.returncode == 0, first.stderr
        assert "applied 0001_core" in first.stdout
        second = run_cli(["migrate"], env)
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip() == "migrations are current"
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        finally:
            await conn.close()
        versions = [r["version"] for r in rows]
        assert versions == sorted(set(versions)) and versions[0] == 1
        assert len(versions) == len(re.findall(r"^applied ", first.stdout, re.MULTILINE))


def test_token_with_given_secret_verifies() -> None:
    secret = "cli-test-secret-0123456789abcdef"
    out = run_cli(["token", "bob", "--ttl", "120"], clean_env(FLASHSALE_JWT_SECRET=secret))
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), secret, algorithms=["HS256"])
    assert claims["sub"] == "bob" and 100 <= claims["exp"] - time.time() <= 121
    for bad in (["token", "u" * 65], ["token", "bob", "--ttl", "0"]):
        res = run_cli(bad, clean_env(FLASHSALE_JWT_SECRET=secret))
        assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr
        assert res.stderr.startswith("flashsale: ")


def test_help_for_every_subcommand() -> None:
    top = run_cli(["--help"], clean_env())
    assert top.returncode == 0 and "usage: flashsale" in top.stdout
    for cmd in SUBCOMMANDS:
        assert cmd in top.stdout
        res = run_cli([cmd, "--help"], clean_env())
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"usage: flashsale {cmd}"), res.stdout


@pytest.mark.parametrize(
    ("cmd", "var", "value"),
    [
        ("up", "FLASHSALE_JWT_SECRET", "short"),
        ("token", "FLASHSALE_JWT_SECRET", "short"),
        ("up", "FLASHSALE_ADMIN_TOKEN", "has spaces in the admin token"),
        ("up", "FLASHSALE_WEBHOOK_SECRET", "x" * 513),
        ("up", "FLASHSALE_PORT", "eighty"),
        ("up", "FLASHSALE_PORT", "70000"),
        ("up", "FLASHSALE_REDIS_URL", "http://127.0.0.1:6379"),
        ("migrate", "FLASHSALE_DATABASE_URL", "mysql://x:s3cret-pw@127.0.0.1/db"),
        ("migrate", "FLASHSALE_DATABASE_URL", "postgresql://x:s3cret-pw@[::1/db"),
        ("up", "FLASHSALE_REDIS_URL", "redis://127.0.0.1:port/0"),
    ],
)
def test_invalid_configuration_stops_with_a_clear_message(
    cmd: str, var: str, value: str, data_dir: Path
) -> None:
    args = [cmd, "alice"] if cmd == "token" else [cmd]
    res = run_cli(args, clean_env(FLASHSALE_DATA_DIR=str(data_dir), **{var: value}), 30.0)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    assert var in res.stderr and "configuration" in res.stderr, res.stderr
    if var.endswith(("_URL", "_SECRET", "_TOKEN")):  # may hold credentials: never echoed
        assert value not in res.stderr and "s3cret-pw" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) <= 3
    assert processes_mentioning(data_dir) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens once the socket is closed


async def test_unreachable_or_refusing_servers_are_a_message_not_a_traceback(
    server_urls: tuple[str, str], database_url: str
) -> None:
    missing_db = with_database(server_urls[1], "flashsale_no_such_db_" + secrets.token_hex(3))
    dead_redis = f"redis://127.0.0.1:{_closed_port()}/0"
    sale_id = "sl_" + secrets.token_hex(6)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO sales (sale_id, sku, name, price_cents, stock, per_user_limit, "
            "starts_at, hold_seconds) VALUES ($1, 'S', 'n', 1, 1, 1, now(), 60)",
            sale_id,
        )
    finally:
        await conn.close()
    cases = [
        (["migrate"], server_urls[0], missing_db, "does not exist"),
        (["up"], server_urls[0], missing_db, "does not exist"),
        (["reconcile", sale_id], server_urls[0], missing_db, "does not exist"),
        (["reconcile", sale_id], dead_redis, database_url, "Redis"),
        (["migrate"], server_urls[0], f"postgresql://postgres@127.0.0.1:{_closed_port()}/x",
         "refused"),
    ]
    for args, redis_url, db_url, says in cases:
        env = clean_env(
            FLASHSALE_REDIS_URL=redis_url, FLASHSALE_DATABASE_URL=db_url, FLASHSALE_PORT="0"
        )
        res = run_cli(args, env, 60.0)
        assert res.returncode == 1, (args, res.returncode, res.stderr)
        assert "Traceback" not in res.stderr, (args, res.stderr)
        assert res.stderr.startswith("flashsale: ") and says in res.stderr, (args, res.stderr)
