"""A sale's waiting-room settings: parsed from the sale body, kept in PostgreSQL
(``sales.waiting_room``, jsonb) and copied into Redis's sale hash.

The request shape and its bounds live here, in one place, so that they can
move to the declared request shapes (msgspec) unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import orjson

from flashsale.errors import InvalidRequest

ADMIT_PER_S_MIN, ADMIT_PER_S_MAX = 1, 100_000
PASS_SECONDS_MIN, PASS_SECONDS_MAX, PASS_SECONDS_DEFAULT = 10, 3600, 300
OVERSUBSCRIBE_MIN, OVERSUBSCRIBE_MAX, OVERSUBSCRIBE_DEFAULT = 1, 10, 2
ROOM_FIELDS = frozenset({"admit_per_s", "pass_seconds", "oversubscribe"})
PATCH_FIELDS = frozenset({"admit_per_s", "paused"})


def _int(body: dict[str, Any], name: str, lo: int, hi: int, default: int | None) -> int:
    if name not in body:
        if default is None:
            raise InvalidRequest(f"waiting_room.{name} is required")
        return default
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(f"{name} must be an integer")
    if not lo <= v <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi}")
    return v


@dataclass(frozen=True, slots=True)
class RoomSettings:
    admit_per_s: int
    pass_seconds: int
    oversubscribe: float
    paused: bool = False

    @classmethod
    def parse(cls, raw: Any) -> RoomSettings | None:
        """The sale body's ``waiting_room``: null (no room) or the object."""
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise InvalidRequest("waiting_room must be null or an object")
        unknown = sorted(set(raw) - ROOM_FIELDS)
        if unknown:
            raise InvalidRequest(f"unknown field(s) in waiting_room: {', '.join(unknown)}")
        over = raw.get("oversubscribe", OVERSUBSCRIBE_DEFAULT)
        if isinstance(over, bool) or not isinstance(over, int | float):
            raise InvalidRequest("oversubscribe must be a number")
        if not OVERSUBSCRIBE_MIN <= over <= OVERSUBSCRIBE_MAX:
            raise InvalidRequest(
                f"oversubscribe must be between {OVERSUBSCRIBE_MIN} and {OVERSUBSCRIBE_MAX}"
            )
        return cls(
            admit_per_s=_int(raw, "admit_per_s", ADMIT_PER_S_MIN, ADMIT_PER_S_MAX, None),
            pass_seconds=_int(raw, "pass_seconds", PASS_SECONDS_MIN, PASS_SECONDS_MAX,
                              PASS_SECONDS_DEFAULT),
            oversubscribe=float(over),
        )

    def patched(self, body: dict[str, Any]) -> RoomSettings:
        """The admin PATCH ``{"admit_per_s"?: int, "paused"?: bool}``."""
        unknown = sorted(set(body) - PATCH_FIELDS)
        if unknown:
            raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}")
        paused = body.get("paused", self.paused)
        if not isinstance(paused, bool):
            raise InvalidRequest("paused must be a boolean")
        rate = _int(body, "admit_per_s", ADMIT_PER_S_MIN, ADMIT_PER_S_MAX, self.admit_per_s)
        return replace(self, admit_per_s=rate, paused=paused)

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
