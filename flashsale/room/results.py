"""The typed result of each waiting-room script (lua/room_*.lua): its codes as
IntEnums, its replies as dataclasses, read from the raw reply in one place
(flashsale/core/scripts.py types the other scripts the same way; room/keys.py
has the KEYS of each)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeVar

from flashsale import errors
from flashsale.core.clients import as_text
from flashsale.room.eta import RoomNow

Code = TypeVar("Code", bound=IntEnum)


def _refusal(raw: list[Any], codes: type[Code]) -> Code | None:
    """The script's refusal (a negative first entry, nothing written), or None."""
    code = int(raw[0])
    return codes(code) if code < 0 else None


class JoinCode(IntEnum):
    """room_join-6.lua."""

    CREATED = 0
    EXISTING = 1  # the buyer's ticket, whatever its state; nothing written
    SALE_NOT_FOUND = -1
    WAITING_ROOM_OFF = -2
    SOLD_OUT = -3  # the room is closed
    SALE_NOT_ACTIVE = -4  # the sale has ended
    OVERLOADED = -5  # the room holds tickets_max tickets


JOIN_ERRORS: dict[JoinCode, type[errors.FlashsaleError]] = {
    JoinCode.SALE_NOT_FOUND: errors.SaleNotFound,
    JoinCode.WAITING_ROOM_OFF: errors.WaitingRoomOff,
    JoinCode.SOLD_OUT: errors.SoldOut,
    JoinCode.SALE_NOT_ACTIVE: errors.SaleNotActive,
    JoinCode.OVERLOADED: errors.Overloaded,
}


@dataclass(frozen=True, slots=True)
class Joined:
    """room_join-6.lua's reply: the code and the ticket ("" on a refusal)."""

    code: JoinCode
    ticket_id: str

    @classmethod
    def of(cls, raw: list[Any]) -> Joined:
        return cls(JoinCode(int(raw[0])), as_text(raw[1]))


class PollCode(IntEnum):
    """room_poll-7.lua's refusals (nothing written)."""

    SALE_NOT_FOUND = -1
    WAITING_ROOM_OFF = -2
    TICKET_NOT_FOUND = -3  # no such ticket of this buyer


@dataclass(frozen=True, slots=True)
class Polled:
    """room_poll-7.lua's reply for a ticket of the buyer."""

    state: str  # waiting | admitted | used | sold_out | expired
    position: int | None  # live tickets ahead; None when not waiting or before the start
    pass_expires_ms: int
    poll_after_ms: int
    room: RoomNow

    @classmethod
    def of(cls, raw: list[Any]) -> Polled | PollCode:
        if (refused := _refusal(raw, PollCode)) is not None:
            return refused
        pos = int(raw[2])
        return cls(
            state=as_text(raw[1]), position=pos if pos >= 0 else None,
            pass_expires_ms=int(raw[3]), poll_after_ms=int(raw[4]),
            room=RoomNow(
                rate=float(raw[5]), measured=int(raw[9]) / 1000, paused=int(raw[6]) == 1,
                closed=int(raw[7]) == 1, waiting=int(raw[8]), available=int(raw[11]),
                outstanding=int(raw[10]), oversubscribe=float(as_text(raw[13])),
                starts_ms=int(raw[12]),
            ),
        )


class AdmitCode(IntEnum):
    """room_admit-8.lua's refusals (nothing written)."""

    SALE_NOT_FOUND = -1
    WAITING_ROOM_OFF = -2


@dataclass(frozen=True, slots=True)
class AdmitStep:
    """room_admit-8.lua's reply: what one admission call did and saw."""

    admitted: int
    expired: int  # dropped tickets and lapsed unused passes retired by this call
    available: int
    closed: bool
    waiting: int

    @classmethod
    def of(cls, raw: list[Any]) -> AdmitStep | AdmitCode:
        if (refused := _refusal(raw, AdmitCode)) is not None:
            return refused
        return cls(int(raw[1]), int(raw[2]), int(raw[3]), int(raw[4]) == 1, int(raw[5]))


class CloseCode(IntEnum):
    """room_close-3.lua."""

    CLOSED = 1  # closed now
    NOT_CLOSED = 0  # a condition no longer holds (stock, pending, or a new reservation)
    ALREADY = 2
    SALE_NOT_FOUND = -1
    WAITING_ROOM_OFF = -2


class Configured(IntEnum):
    """room_configure-1.lua."""

    WRITTEN = 1
    SALE_MISSING = -1  # nothing written: the sale's rebuild writes the hash, then calls again
