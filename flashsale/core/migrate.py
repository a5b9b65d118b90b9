"""Plain-SQL migrations: ``migrations/NNNN_<what>.sql``, applied in order
under an advisory lock, each in its own transaction, recorded in a ledger."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from flashsale.core.clients import Conn

_PKG = Path(__file__).resolve().parents[1]  # the flashsale package
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_ID = 0x666C6173  # "flas"

_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path


def migrations_dir() -> Path:
    for candidate in (_PKG.parent / "migrations", _PKG / "_data" / "migrations"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("migrations/ not found next to the flashsale package")


def available() -> list[Migration]:
    found = []
    for path in sorted(migrations_dir().iterdir()):
        m = _NAME.match(path.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), path))
    return found


async def applied_versions(conn: Conn) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    rows = await conn.fetch("SELECT version FROM schema_migrations")
    return {int(r["version"]) for r in rows}


async def is_current(conn: Conn) -> bool:
    return {m.version for m in available()} <= await applied_versions(conn)


async def migrate(conn: Conn) -> list[Migration]:
    """Apply what is missing; safe to run from several processes at once."""
    done: list[Migration] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(_LEDGER)
        have = await applied_versions(conn)
        for mig in available():
            if mig.version in have:
                continue
            async with conn.transaction():
                await conn.execute(mig.path.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    mig.version,
                    mig.name,
                )
            done.append(mig)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return done
