"""What one reservation is and what it becomes: the batch item (its packing
for lua/reserve_batch-8.lua), its outcome (an accepted order, or a decided
refusal as a value), and the answers' texts when Redis cannot give one.
Shared by the reserver (core/reserve.py) and the resolution of a lost reply
(core/resolve.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from flashsale import errors
from flashsale.core import record
from flashsale.core.keys import SaleKeys
from flashsale.core.record import Order
from flashsale.core.record import new_order_id as new_order_id
from flashsale.core.scripts import (
    ACCEPTED,
    REPLAY,
    RESERVE_ERRORS,
    ReserveCode,
)

log = logging.getLogger(__name__)

OUTCOME_UNKNOWN = (
    "the connection to Redis broke during the reservation; the outcome is unknown: retry "
    "with the same Idempotency-Key to get it"
)
NOT_RESERVED = "Redis did not answer the reservation in time; nothing was reserved: retry"
RELEASED = (
    "Redis did not answer the reservation in time and its outcome is unknown, so it was "
    "cancelled: nothing stays reserved (stock it may have taken is being returned); retry"
)
UNKNOWN_KEYLESS = (
    "Redis and PostgreSQL did not answer during the reservation; its outcome is unknown and, "
    "without an Idempotency-Key, cannot be looked up: an order made then holds its stock "
    "until it expires. Send an Idempotency-Key to make a retry return the first outcome"
)
NOT_VERIFIED = (
    "Redis is being checked against PostgreSQL (it restarted or failed over); nothing was "
    "reserved: retry shortly"
)
RELEASE_ACTOR = "reserver"
RELEASE_DETAIL = "reservation reply lost; released before the 503"
UNREPLICATED_DETAIL = "not acknowledged by enough Redis replicas in time; released before the 503"
RESOLVE_PAUSE_S = 0.05  # between lookups of a lost reply (each bounded by redis_timeout_s)
VOID_KEEP_MS = 86_400_000  # a voided order id is refused this long (lua/resolve_orders-3.lua)
CLAIM_MARGIN_S = 300  # a cluster key claim outlives the sale's record it guards by this
CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # the packing's separators and the records'


@dataclass(frozen=True, slots=True)
class Accepted:
    """A reservation's acceptance: the order it made, and whether this answer
    is a replay (from the idempotency key's record)."""

    order: Order
    replay: bool

    @property
    def order_id(self) -> str:
        return self.order.order_id

    @property
    def sale_id(self) -> str:
        return self.order.sale_id

    def body(self) -> dict[str, Any]:
        return self.order.body()


@dataclass(slots=True)
class Item:
    user_id: str
    quantity: int
    idempotency_key: str | None
    future: asyncio.Future[Outcome]
    ticket: str = field(default="")  # the waiting-room pass's ticket (verified by the front)
    order_id: str = field(default="")
    fingerprint: bytes = field(default=b"")
    record_key: bytes | None = field(default=None)  # the idempotency record's key, if keyed
    packed: bytes = field(default=b"")  # its one reserve_batch argument


def fingerprint(sale_id: str, quantity: int) -> str:
    return f"{sale_id}|{quantity}"


def accepted(sale_id: str, item: Item, detail: str, replay: bool) -> Accepted:
    """The item's order from its acceptance (see flashsale/core/record.py),
    made when its order id says (the batch's now_ms, or the first request's)."""
    created_ms = record.created_ms_of(detail.partition("\t")[0])
    return Accepted(record.from_acceptance(
        sale_id, item.user_id, item.idempotency_key, created_ms, detail
    ), replay)


@dataclass(frozen=True, slots=True)
class Refused:
    """A decided refusal (sold out, limit, not active, key reused, no sale).

    A value, not an exception: refusals are most answers in a flash sale, and
    raising one per request costs a traceback and frame cycles for the GC.
    """

    error: type[errors.FlashsaleError]
    replay: bool


Outcome = Accepted | Refused
REFUSED = {code: Refused(cls, replay=False) for code, cls in RESERVE_ERRORS.items()}
REFUSED_REPLAY = {code: Refused(cls, replay=True) for code, cls in RESERVE_ERRORS.items()}
KEY_REUSED = REFUSED[ReserveCode.KEY_REUSED]


def outcome(sale_id: str, item: Item, code: int, detail: str) -> Outcome:
    """Map one script result (see lua/reserve_batch-8.lua) to its outcome."""
    if code == ACCEPTED:
        return accepted(sale_id, item, detail, replay=False)
    if code == REPLAY:
        _fp, stored_code, stored_detail = detail.split("\n", 2)
        if int(stored_code) == ACCEPTED:
            return accepted(sale_id, item, stored_detail, replay=True)
        return REFUSED_REPLAY[int(stored_code)]
    return REFUSED[code]


def pack(k: SaleKeys, items: list[Item], now_ms: int) -> list[Item]:
    """Give each item its order id and its encoded script argument, item by
    item: one that cannot be packed (a user id or key that is not valid UTF-8
    or holds a separator; authentication refuses them first) fails alone.
    Returns the items packed."""
    packed = []
    for item in items:
        item.order_id = new_order_id(k.sale_id, now_ms)
        try:
            user = item.user_id.encode()
        except UnicodeEncodeError:
            user = b""
        if not user or CONTROL.search(item.user_id):
            item.future.set_exception(errors.Unauthorized(
                "the token's sub must be valid Unicode without control characters"
            ))
            continue
        key = item.idempotency_key
        if key is not None and (not key.isascii() or CONTROL.search(key)):
            item.future.set_exception(errors.InvalidRequest(
                "Idempotency-Key must be 1-128 printable ASCII characters"
            ))
            continue
        fp = fingerprint(k.sale_id, item.quantity).encode()
        item.fingerprint = fp
        if key is None:
            flag, text = b"0", b""
        else:
            item.record_key = k.idempotency(item.user_id, key).encode()
            flag, text = b"1", key.encode()
        item.packed = b"\x1f".join(
            (item.order_id.encode(), user, b"%d" % item.quantity, flag, fp, text,
             item.ticket.encode())
        )
        packed.append(item)
    return packed




def fail_all(items: list[Item], exc: errors.FlashsaleError) -> None:
    """Answer every item not answered yet with ``exc``."""
    for item in items:
        if not item.future.done():
            item.future.set_exception(exc)
