"""A mock carrier: books shipments in-process, with configurable failure and latency.

Booking is idempotent by order id (a real carrier's idempotency key): the
shipment id and tracking number are derived from the order id, so a retry
after a crash between the booking and our commit books the same shipment.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from dataclasses import dataclass


class CarrierError(Exception):
    """The carrier refused or failed the booking."""


@dataclass(frozen=True, slots=True)
class Booking:
    shipment_id: str
    tracking_number: str


def booking_for(order_id: str) -> Booking:
    digest = hashlib.sha256(f"shipment:{order_id}".encode()).hexdigest()
    return Booking(f"shp_{digest[:24]}", f"1Z{digest[24:40].upper()}")


class MockCarrier:
    """Stand-in for the logistics provider. ``down`` makes every booking fail;
    ``failure_rate`` fails a fraction; ``latency_s`` delays each call."""

    def __init__(
        self, *, down: bool = False, failure_rate: float = 0.0, latency_s: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.down = down
        self.failure_rate = failure_rate
        self.latency_s = latency_s
        self.calls = 0
        self._rng = random.Random(seed)

    async def book(self, order_id: str, quantity: int) -> Booking:
        self.calls += 1
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        if self.down:
            raise CarrierError("carrier unavailable")
        if self.failure_rate > 0 and self._rng.random() < self.failure_rate:
            raise CarrierError("carrier rejected the booking")
        if quantity < 1:
            raise CarrierError("nothing to ship")
        return booking_for(order_id)
