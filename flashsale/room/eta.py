"""The ETA of a place in the waiting room, as a range, or None when nobody can know.

From the admissions measured over the last seconds (room_admit-8.lua keeps the
rate of its last 10 s in the room hash) and the configured rate:

- paused: None (it resumes when the operator says so);
- waiting on held stock (available is 0: only a hold that expires or is
  cancelled lets anyone in) or on passes (as many unused passes as
  ``available x oversubscribe``): None, the honest answer;
- before the start: the time to the start, up to that plus every ticket
  taken so far at the configured rate (the lottery has not placed anyone);
- otherwise ``ahead / max(rate, measured)`` to ``ahead / min(rate, measured)``
  (the configured rate when nothing was measured yet), rounded outwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RoomNow:
    """The room's figures one poll (or one admin read) returns."""

    rate: float
    measured: float
    paused: bool
    closed: bool
    waiting: int
    available: int
    outstanding: int
    oversubscribe: float
    starts_ms: int


def eta_range(r: RoomNow, ahead: int | None, now_ms: int) -> tuple[int, int] | None:
    """Seconds until a ticket with ``ahead`` live tickets before it is admitted
    (``ahead`` None: before the start, the place is not drawn yet)."""
    if r.paused or r.closed or r.rate <= 0:
        return None
    if ahead is None or now_ms < r.starts_ms:
        until = max(0, math.ceil((r.starts_ms - now_ms) / 1000))
        return until, until + math.ceil(max(r.waiting, 1) / r.rate)
    if r.available <= 0 or r.outstanding >= math.floor(r.available * r.oversubscribe):
        return None
    fast = max(r.rate, r.measured)
    slow = min(r.rate, r.measured) if r.measured > 0 else r.rate
    return math.floor(ahead / fast), math.ceil(ahead / slow) + 1
