"""A sale's waiting-room settings: read from the sale body's shape
(flashsale/schemas/bodies.py ``WaitingRoom``, which owns the bounds and the
400 messages), kept in PostgreSQL (``sales.waiting_room``, jsonb) and copied
into Redis's sale hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from flashsale.schemas.bodies import WaitingRoom


@dataclass(frozen=True, slots=True)
class RoomSettings:
    admit_per_s: int
    pass_seconds: int
    oversubscribe: float
    paused: bool = False

    @classmethod
    def of(cls, shape: WaitingRoom | None) -> RoomSettings | None:
        """The sale body's decoded ``waiting_room``: None (no room) or its settings."""
        if shape is None:
            return None
        return cls(shape.admit_per_s, shape.pass_seconds, float(shape.oversubscribe))

    @classmethod
    def from_row(cls, raw: Any) -> RoomSettings | None:
        """From the ``sales.waiting_room`` column (jsonb, as asyncpg's text)."""
        if raw is None:
            return None
        d = orjson.loads(raw) if isinstance(raw, str | bytes) else raw
        return cls(int(d["admit_per_s"]), int(d["pass_seconds"]), float(d["oversubscribe"]),
                   bool(d.get("paused", False)))

    def to_json(self) -> str:
        return orjson.dumps({
            "admit_per_s": self.admit_per_s, "pass_seconds": self.pass_seconds,
            "oversubscribe": self.oversubscribe, "paused": self.paused,
        }).decode()

    def public(self) -> dict[str, Any]:
        """What GET sale shows (the contract's three fields)."""
        over: float | int = self.oversubscribe
        if float(over).is_integer():
            over = int(over)
        return {"admit_per_s": self.admit_per_s, "pass_seconds": self.pass_seconds,
                "oversubscribe": over}

    def redis_args(self) -> list[str]:
        """rate, pass_ms, oversub, paused: load_sale's extra ARGV and room_configure's."""
        return [str(self.admit_per_s), str(self.pass_seconds * 1000), repr(self.oversubscribe),
                "1" if self.paused else "0"]


def public_of_row(raw: Any) -> dict[str, Any] | None:
    room = RoomSettings.from_row(raw)
    return None if room is None else room.public()
