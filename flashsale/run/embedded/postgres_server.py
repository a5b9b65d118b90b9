"""The embedded PostgreSQL: cluster creation, password authentication, readiness.

The cluster lives in ``data_dir/postgres``; it is created once with ``initdb``
(scram-sha-256 for local and TCP connections, the superuser's password given
through a 0600 password file) and reused. ``pg_hba.conf`` is written by us (a
marker line says so): every connection, over TCP or the Unix socket, needs the
password, so another local user cannot reach the stock.

A cluster made before passwords existed (``--auth=trust``, no marker in
``pg_hba.conf``) is upgraded on its next start: while its old ``trust`` rules
still let us in, the role gets the password (``ALTER ROLE ... PASSWORD``), then
``pg_hba.conf`` is replaced and reloaded. Each step is idempotent, so a crash
half-way is finished by the following start.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePath

import asyncpg

from flashsale.run.embedded.binaries import PostgresBinaries
from flashsale.run.embedded.proc import (
    LOOPBACK,
    Aborted,
    Child,
    EmbeddedError,
    ServerExited,
    cmdline,
    log_tail,
    open_log,
    pid_alive,
    popen,
    run_coroutine,
)
from flashsale.run.embedded.users import RunAs, private_dir, private_file

HBA_MARKER = "# flashsale: password authentication (scram-sha-256) for every connection"
HBA_CONF = f"""{HBA_MARKER}
# Written by flashsale (flashsale/run/embedded/postgres_server.py); the superuser's
# password is kept in the data dir's secrets.json.
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  scram-sha-256
host    all          all   127.0.0.1/32   scram-sha-256
host    all          all   ::1/128        scram-sha-256
local   replication  all                  scram-sha-256
host    replication  all   127.0.0.1/32   scram-sha-256
host    replication  all   ::1/128        scram-sha-256
"""
_CONNECT_TIMEOUT_S = 2.0
_INITDB_TIMEOUT_MIN_S = 120.0
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin
_PG_FATAL = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidPasswordError,
)


@dataclass(frozen=True)
class PostgresSpec:
    """Everything needed to (re)start the embedded PostgreSQL on a given port."""

    bins: PostgresBinaries
    pgdata: Path  # resolved
    sockets: str  # Unix socket directory, "" for TCP only
    user: str
    database: str
    password: str
    extra_args: tuple[str, ...] = ()

    def argv(self, port: int) -> list[str]:
        return [
            str(self.bins.postgres),
            "-D", str(self.pgdata),
            "-p", str(port),
            "-h", LOOPBACK,
            "-k", self.sockets,
            "-c", "max_connections=200",
            "-c", "password_encryption=scram-sha-256",
            *self.extra_args,
        ]  # fmt: skip

    def url(self, port: int) -> str:
        return (
            f"postgresql://{self.user}:{self.password}@{LOOPBACK}:{port}/{self.database}"
        )

    def hba_is_ours(self) -> bool:
        try:
            first = (self.pgdata / "pg_hba.conf").read_text().split("\n", 1)[0]
        except OSError:
            return False
        return first == HBA_MARKER


def socket_dir(data_dir: Path, who: RunAs | None) -> str:
    """Unix socket directory, or "" (TCP only) when the path would be too long."""
    run_dir = data_dir / "run"
    if len(str(run_dir / ".s.PGSQL.65535.lock")) > _SOCKET_PATH_MAX:
        return ""
    return str(private_dir(run_dir, who))


def clear_stale_postmaster_pid(pgdata: Path) -> None:
    """Remove a lock file left by a killed server; refuse if one still runs."""
    pidfile = pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return
    if pid_alive(pid) and "postgres" in cmdline(pid):
        raise EmbeddedError(
            f"a PostgreSQL server (pid {pid}) is already running on {pgdata}; stop it first"
        )
    pidfile.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# initdb
# ---------------------------------------------------------------------------


def initdb(
    spec: PostgresSpec, data_dir: Path, who: RunAs | None, timeout_s: float
) -> None:
    """Create the cluster in a scratch dir, then rename: never a half-made cluster."""
    pgdata = spec.pgdata
    if pgdata.exists() and any(pgdata.iterdir()):
        raise EmbeddedError(f"{pgdata} exists but is not a PostgreSQL cluster (no PG_VERSION)")
    scratch = data_dir / "postgres.initdb-tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    private_dir(scratch, who)
    pwfile = private_file(data_dir / ".initdb-password", spec.password + "\n", who)
    argv = [
        str(spec.bins.initdb), "-D", str(scratch), "-U", spec.user,
        "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C",
    ]  # fmt: skip
    log_path = data_dir / "initdb.log"
    log, start = open_log(log_path, f"initdb (PostgreSQL {spec.bins.major})")
    try:
        with log:
            proc = popen(argv, log=log, cwd=data_dir, who=who)
            try:
                code = proc.wait(timeout=max(_INITDB_TIMEOUT_MIN_S, timeout_s))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    finally:
        pwfile.unlink(missing_ok=True)
    if code != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise EmbeddedError(
            f"initdb failed with status {code}; last lines of {log_path}:\n"
            f"{log_tail(log_path, start)}"
        )
    private_file(scratch / "pg_hba.conf", HBA_CONF, who)
    if pgdata.exists():
        pgdata.rmdir()
    scratch.rename(pgdata)


# ---------------------------------------------------------------------------
# Readiness (and the one-time password upgrade)
# ---------------------------------------------------------------------------


async def _is_ours(conn: asyncpg.Connection, pgdata: Path) -> bool:
    served = await conn.fetchval("SHOW data_directory")
    return PurePath(str(served)) == PurePath(pgdata)  # pgdata is resolved already


async def _connect_once(
    child: Child, spec: PostgresSpec, password: str | None
) -> asyncpg.Connection | None:
    """A superuser connection to *our* server, or None if it is not up yet."""
    try:
        conn = await asyncpg.connect(
            host=LOOPBACK, port=child.port, user=spec.user, password=password,
            database="postgres", timeout=_CONNECT_TIMEOUT_S,
        )  # fmt: skip
    except _PG_FATAL as exc:
        if child.proc.poll() is not None:  # someone else's server on "our" port
            raise ServerExited from exc
        hint = (
            " (its password is kept in the data dir's secrets.json: was that file replaced?)"
            if password is not None
            else ""
        )
        raise child.failure(f"refused the connection: {exc}{hint}") from exc
    if await _is_ours(conn, spec.pgdata):
        return conn
    await conn.close()
    return None


async def _connect_when_ready(
    child: Child,
    spec: PostgresSpec,
    password: str | None,
    deadline: float,
    abort: threading.Event | None,
) -> asyncpg.Connection:
    last: BaseException | None = None
    while True:
        if child.proc.poll() is not None:
            raise ServerExited
        if abort is not None and abort.is_set():
            raise Aborted
        try:
            conn = await _connect_once(child, spec, password)
        except (EmbeddedError, ServerExited):
            raise
        except Exception as exc:  # refused, starting up, reset...: keep waiting
            last, conn = exc, None
        if conn is not None:
            return conn
        if time.monotonic() > deadline:
            raise child.failure(f"did not accept connections in time (last error: {last!r})")
        await asyncio.sleep(0.1)


async def _set_password(conn: asyncpg.Connection, spec: PostgresSpec, who: RunAs | None) -> None:
    """The legacy (trust) cluster gets its password, then our pg_hba.conf."""
    await conn.execute("SET password_encryption = 'scram-sha-256'")
    statement = await conn.fetchval(
        "SELECT format('ALTER ROLE %I PASSWORD %L', $1::text, $2::text)",
        spec.user,
        spec.password,
    )
    await conn.execute(statement)
    private_file(spec.pgdata / "pg_hba.conf", HBA_CONF, who)
    await conn.fetchval("SELECT pg_reload_conf()")


async def _ready(
    child: Child,
    spec: PostgresSpec,
    who: RunAs | None,
    timeout_s: float,
    abort: threading.Event | None,
) -> None:
    deadline = time.monotonic() + timeout_s
    if not spec.hba_is_ours():
        conn = await _connect_when_ready(child, spec, None, deadline, abort)
        try:
            await _set_password(conn, spec, who)
        finally:
            await conn.close()
    conn = await _connect_when_ready(child, spec, spec.password, deadline, abort)
    try:
        exists = await conn.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", spec.database
        )
        if not exists:
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{spec.database}"')
    finally:
        await conn.close()


def wait_ready(
    child: Child,
    spec: PostgresSpec,
    who: RunAs | None,
    timeout_s: float,
    abort: threading.Event | None = None,
) -> None:
    """Block until our server accepts password logins and has the database."""
    run_coroutine(lambda: _ready(child, spec, who, timeout_s, abort))
