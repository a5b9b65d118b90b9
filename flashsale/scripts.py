"""The one loader for Lua scripts, and the typed results of reserve_batch.

Scripts live in ``lua/`` (shipped as package data). redis-py's
``register_script`` runs EVALSHA and reloads the script on NOSCRIPT, so a
Redis restart with an empty script cache costs one extra round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from redis.asyncio import Redis, RedisCluster
from redis.commands.core import AsyncScript

from flashsale import errors

_PKG = Path(__file__).resolve().parent

RedisClient: TypeAlias = "Redis | RedisCluster"


def lua_dir() -> Path:
    """lua/ beside the package in a checkout, or the wheel's packaged copy."""
    for candidate in (_PKG.parent / "lua", _PKG / "_data" / "lua"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("lua/ scripts not found next to the flashsale package")


SCRIPT_FILES = {
    "reserve_batch": "reserve_batch.lua",
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
    forget_idempotency: AsyncScript

    @classmethod
    def register(cls, redis: RedisClient) -> Scripts:
        base = lua_dir()
        loaded: dict[str, Any] = {
            name: redis.register_script((base / fname).read_text())
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


# reserve_batch result codes, in order of precedence (see lua/reserve_batch.lua)
ACCEPTED = 0
REPLAY = 1
RESERVE_ERRORS: dict[int, type[errors.FlashsaleError]] = {
    -1: errors.SaleNotFound,
    -2: errors.SaleNotActive,
    -3: errors.IdempotencyKeyReused,
    -4: errors.LimitExceeded,
    -5: errors.SoldOut,
}
CODE_OF_ERROR = {cls.code: code for code, cls in RESERVE_ERRORS.items()}
# the order id was voided by resolve_orders (its reply was lost and it had not
# run): only a late copy of a lost request gets it; nothing written
VOIDED = -6
