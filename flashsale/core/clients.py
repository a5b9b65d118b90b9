"""What the Redis and PostgreSQL clients hand over, named once: a leaf module
(nothing of flashsale imported), so the order record and the events need not
import the connection code (flashsale/core/backends.py) to read a reply."""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# a PostgreSQL connection: one of its own, or one borrowed from the pool
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"


def as_text(raw: bytes | str) -> str:
    """A Redis reply as text: the client hands replies over undecoded (bytes)."""
    return raw.decode() if isinstance(raw, bytes) else raw
