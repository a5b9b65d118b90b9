"""Request bodies, each declared once: what msgspec decodes and the OpenAPI document states.

Each is read by a :class:`flashsale.schemas.decode.BodyReader` (strict:
exact JSON types, integers as JSON Schema's (``2.0`` is 2), no unknown field). What JSON
Schema cannot say is checked in ``__post_init__`` (control characters) or by
the code that turns the shape into a domain object (a sale's timestamps:
flashsale/core/sales.py), and said in the field's description.

To add a field: add it here with its ``Annotated`` bounds (a nested object
is one more ``Shape`` subclass, as ``SaleCreate.waiting_room``); the
decoder, the error messages and the document follow.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import UNSET, Meta, UnsetType

from flashsale.core.statuses import (
    SETTLE_OUTCOMES,
    WEBHOOK_EVENT_TYPES,
    SettleOutcome,
    WebhookEventType,
)
from flashsale.schemas import bounds as b
from flashsale.schemas.fields import Shape, choice, integer, plain_text, text, timestamp

_LO, _HI = b.TIMESTAMP_YEARS
_WINDOW = f"ISO-8601 with an offset (UTC expected; years {_LO}–{_HI})"


class WaitingRoom(Shape):
    """(v1.1) A waiting room in front of the sale: admission at a rate, bounded by the stock."""

    admit_per_s: Annotated[int, integer(
        *b.ROOM_ADMIT_PER_S, "Admissions per second for the whole sale (all front processes).")]
    pass_seconds: Annotated[int, integer(
        *b.ROOM_PASS_SECONDS, "How long an admitted ticket's pass stays valid.")
    ] = b.ROOM_PASS_SECONDS_DEFAULT
    oversubscribe: Annotated[float, Meta(
        ge=b.ROOM_OVERSUBSCRIBE[0], le=b.ROOM_OVERSUBSCRIBE[1],
        description="Unused passes stay below available × this.",
    )] = b.ROOM_OVERSUBSCRIBE_DEFAULT


class WaitingRoomPatch(Shape):
    """Change the waiting room's rate, pause or resume it; an absent field stays as it is."""

    admit_per_s: Annotated[int, integer(*b.ROOM_ADMIT_PER_S, "Admissions per second.")] | (
        UnsetType
    ) = UNSET
    paused: Annotated[bool, Meta(description="true: no admission until false.")] | (
        UnsetType
    ) = UNSET


class SaleCreate(Shape):
    """New sale. Unknown fields are rejected with 400 `invalid_request`."""

    sku: Annotated[str, text(b.SKU_MAX_CHARS, "Stock-keeping unit.")]
    name: Annotated[str, text(b.NAME_MAX_CHARS, "Display name.")]
    price_cents: Annotated[int, integer(0, b.MAX_PRICE_CENTS, "Unit price in cents.")]
    stock: Annotated[int, integer(0, b.MAX_STOCK, "Initial stock.")]
    per_user_limit: Annotated[
        int, integer(1, b.MAX_PER_USER_LIMIT,
                     "Max quantity one buyer may hold across accepted orders.")
    ] = b.DEFAULT_PER_USER_LIMIT
    starts_at: Annotated[str, timestamp(f"{_WINDOW}; defaults to now.")] | UnsetType = UNSET
    ends_at: Annotated[
        str, timestamp(f"{_WINDOW}, after `starts_at`; or null: no end.")
    ] | None = None
    hold_seconds: Annotated[
        int, integer(1, b.MAX_HOLD_SECONDS, "How long an unpaid order holds its stock.")
    ] = b.DEFAULT_HOLD_SECONDS
    waiting_room: WaitingRoom | None = None  # (v1.1) null: no waiting room

    def __post_init__(self) -> None:
        plain_text("sku", self.sku)
        plain_text("name", self.name)


class Restock(Shape):
    """Stock to add to a sale."""

    quantity: Annotated[
        int, integer(1, b.MAX_QUANTITY, f"Units to add; total stock may not exceed {b.MAX_STOCK}.")
    ]


class OrderCreate(Shape):
    """Order request; `{}` means quantity 1."""

    quantity: Annotated[int, integer(1, b.MAX_QUANTITY, "Units to reserve.")] = 1


class NoBody(Shape):
    """No body, or `{}`: everything of the request (amount, status, buyer) is server-owned."""


class WebhookEvent(Shape):
    """Payment gateway event."""

    event_id: Annotated[
        str, text(b.EVENT_ID_MAX_CHARS, "Gateway event id; processed at most once.")
    ]
    type: Annotated[WebhookEventType, choice(WEBHOOK_EVENT_TYPES, "Event type.")]
    payment_id: Annotated[str, text(b.REFERENCE_MAX_CHARS)]
    order_id: Annotated[str, text(b.REFERENCE_MAX_CHARS)]
    amount_cents: Annotated[int, integer(0, b.MAX_AMOUNT_CENTS, "Amount paid, in cents.")]

    def __post_init__(self) -> None:
        plain_text("event_id", self.event_id)
        plain_text("payment_id", self.payment_id)
        plain_text("order_id", self.order_id)


class GatewaySettle(Shape):
    """Settle a payment through the mock gateway (development and tests)."""

    outcome: Annotated[
        SettleOutcome, choice(SETTLE_OUTCOMES, "How the mock gateway settles the payment.")
    ]


REQUEST_BODIES = (SaleCreate, Restock, OrderCreate, WebhookEvent, GatewaySettle, WaitingRoomPatch)
