"""The one loader for Lua scripts, and the typed result of each of them.

Scripts live in ``lua/`` (shipped as package data). redis-py's
``register_script`` runs EVALSHA and reloads the script on NOSCRIPT, so a
Redis restart with an empty script cache costs one extra round trip.

A script run by its SHA cannot call another, so code that several scripts
share lives in ``lua/lib/`` and a script names it with a line of its own::

    -- @include "lib/checks.lua"

``source`` replaces that line with the file's text (whose own includes are
resolved the same way), each file once per script: a second include of it,
directly or through another file, adds nothing. An include that is missing,
malformed or outside ``lua/`` fails the load (``ScriptSourceError``), never a
call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias

from redis.asyncio import Redis, RedisCluster
from redis.commands.core import AsyncScript

from flashsale import errors

_PKG = Path(__file__).resolve().parents[1]  # the flashsale package

RedisClient: TypeAlias = "Redis | RedisCluster"


def lua_dir() -> Path:
    """lua/ beside the package in a checkout, or the wheel's packaged copy."""
    for candidate in (_PKG.parent / "lua", _PKG / "_data" / "lua"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("lua/ scripts not found next to the flashsale package")


_INCLUDE = re.compile(r"^--\s*@include\b(.*)$", re.MULTILINE)
_INCLUDE_PATH = re.compile(r'\s+"([^"]+)"\s*')
MAX_INCLUDE_DEPTH = 8


class ScriptSourceError(Exception):
    """A script's include is missing, malformed, outside lua/ or nested too deep."""


def source(fname: str, base: Path | None = None) -> str:
    """The text of lua/``fname`` with its includes inlined, as Redis runs it."""
    root = (base or lua_dir()).resolve()
    return _inlined(root, root / fname, fname, set(), 0)


def _inlined(root: Path, path: Path, name: str, seen: set[Path], depth: int) -> str:
    if depth > MAX_INCLUDE_DEPTH:
        raise ScriptSourceError(f"{name}: includes nested deeper than {MAX_INCLUDE_DEPTH}")
    seen.add(path)
    text = path.read_text()

    def expand(m: re.Match[str]) -> str:
        line = text.count("\n", 0, m.start()) + 1
        where = f"{name}, line {line}"
        arg = _INCLUDE_PATH.fullmatch(m.group(1))
        if arg is None:
            raise ScriptSourceError(f"{where}: malformed include {m.group(0)!r}")
        target = (root / arg.group(1)).resolve()
        if not target.is_relative_to(root):
            raise ScriptSourceError(f"{where}: include {arg.group(1)!r} is outside {root}")
        if not target.is_file():
            raise ScriptSourceError(f"{where}: include {arg.group(1)!r} not found in {root}")
        if target in seen:
            return f"-- (included above: {arg.group(1)})"
        return _inlined(root, target, arg.group(1), seen, depth + 1).rstrip("\n")

    return _INCLUDE.sub(expand, text)


SCRIPT_FILES = {
    "reserve_batch": "reserve_batch-8.lua",
    "release": "release-3.lua",
    "ack_persisted": "ack_persisted-3.lua",
    "load_sale": "load_sale-3.lua",
    "restock": "restock-2.lua",
    "rebuild_sale": "rebuild_sale-6.lua",
    "dead_letter": "dead_letter-6.lua",
    "publish_events": "publish_events-1.lua",
    "end_sale": "end_sale-1.lua",
    "undo_delivery": "undo_delivery-1.lua",
    "resolve_orders": "resolve_orders-3.lua",
    # the waiting room (flashsale/room/)
    "room_join": "room_join-6.lua",
    "room_poll": "room_poll-7.lua",
    "room_admit": "room_admit-8.lua",
    "room_close": "room_close-3.lua",
    "room_configure": "room_configure-1.lua",
    "forget_idempotency": "forget_idempotency.lua",
}


@dataclass(frozen=True, slots=True)
class Scripts:
    reserve_batch: AsyncScript
    release: AsyncScript
    ack_persisted: AsyncScript
    load_sale: AsyncScript
    restock: AsyncScript
    rebuild_sale: AsyncScript
    dead_letter: AsyncScript
    publish_events: AsyncScript
    end_sale: AsyncScript
    undo_delivery: AsyncScript
    resolve_orders: AsyncScript
    room_join: AsyncScript
    room_poll: AsyncScript
    room_admit: AsyncScript
    room_close: AsyncScript
    room_configure: AsyncScript
    forget_idempotency: AsyncScript

    @classmethod
    def register(cls, redis: RedisClient, base: Path | None = None) -> Scripts:
        """Every script, its includes inlined (``source``); nothing is sent to
        Redis yet. Raises ``ScriptSourceError`` for a missing or bad include."""
        root = base or lua_dir()
        loaded: dict[str, Any] = {
            name: redis.register_script(source(fname, root))
            for name, fname in SCRIPT_FILES.items()
        }
        return cls(**loaded)

    async def preload(self, redis: RedisClient) -> None:
        """SCRIPT LOAD every script (readiness checks that they are loaded)."""
        for name in SCRIPT_FILES:
            script: AsyncScript = getattr(self, name)
            await redis.script_load(script.script)

    async def all_loaded(self, redis: RedisClient) -> bool:
        shas = [getattr(self, name).sha for name in SCRIPT_FILES]
        flags = await redis.script_exists(*shas)
        return all(bool(f) for f in flags)


# -- the typed result of every script: its codes as values, its errors as classes ----


class ReserveCode(IntEnum):
    """reserve_batch-8.lua's code per item (and resolve_orders-3.lua's: ACCEPTED
    for a reserved order, VOIDED, SALE_NOT_FOUND for a sale Redis lost)."""

    ACCEPTED = 0
    REPLAY = 1  # the key's stored outcome, replayed
    SALE_NOT_FOUND = -1
    SALE_NOT_ACTIVE = -2
    KEY_REUSED = -3
    LIMIT_EXCEEDED = -4
    SOLD_OUT = -5
    # the order id was voided by resolve_orders (its reply was lost and it had
    # not run): only a late copy of a lost request gets it; nothing written
    VOIDED = -6
    # the sale has a waiting room and the item's pass is missing or spent
    # (flashsale/room/): nothing written, no idempotency record kept
    PASS_REQUIRED = -7


ACCEPTED = ReserveCode.ACCEPTED
REPLAY = ReserveCode.REPLAY
VOIDED = ReserveCode.VOIDED
# the refusals, in order of precedence (see lua/reserve_batch-8.lua)
RESERVE_ERRORS: dict[int, type[errors.FlashsaleError]] = {
    ReserveCode.SALE_NOT_FOUND: errors.SaleNotFound,
    ReserveCode.SALE_NOT_ACTIVE: errors.SaleNotActive,
    ReserveCode.KEY_REUSED: errors.IdempotencyKeyReused,
    ReserveCode.LIMIT_EXCEEDED: errors.LimitExceeded,
    ReserveCode.SOLD_OUT: errors.SoldOut,
    ReserveCode.PASS_REQUIRED: errors.PassRequired,
}


class Loaded(IntEnum):
    """load_sale-3.lua."""

    LOADED = 1
    PRESENT = 0  # the sale was there already: nothing changed


class Restocked(IntEnum):
    """restock-2.lua."""

    APPLIED = 1
    ALREADY = 0  # this restock id was applied before
    SALE_MISSING = -1  # not in Redis: its rebuild counts the restock (PostgreSQL has it)


class Ended(IntEnum):
    """end_sale-1.lua."""

    LOWERED = 1
    ALREADY = 0  # ended at or before that time already
    SALE_MISSING = -1  # not in Redis: its rebuild reads ends_at from PostgreSQL


class Rebuilt(IntEnum):
    """rebuild_sale-6.lua."""

    UNCHANGED = 0  # the sale hash exists and its stream is not behind
    REBUILT = 1  # the sale hash was missing
    LOST_WRITES = 2  # rebuilt over a sale whose stream was behind the watermark


RELEASE_SALE_MISSING = -1


def released(raw: list[Any]) -> list[int]:
    """release-3.lua: per order id, the quantity released (> 0), 0 when it held
    nothing, or RELEASE_SALE_MISSING for every order when the sale is not in
    Redis (nothing changed: retry after the rebuild)."""
    return [int(q) for q in raw]


class DeadLettered(NamedTuple):
    """dead_letter-6.lua: whether the entry moved to the dead-letter stream, and
    the quantity its hold gave back (both 0 when it was no longer pending)."""

    moved: bool
    released: int

    @classmethod
    def of(cls, raw: list[Any]) -> DeadLettered:
        return cls(bool(int(raw[0])), int(raw[1]))


# ack_persisted-3.lua, undo_delivery-1.lua, publish_events-1.lua and
# forget_idempotency.lua answer a count (entries acked, counters lowered, events
# appended, idempotency records deleted): an int, as returned.
# The waiting room's scripts (room_*.lua): flashsale/room/results.py.
