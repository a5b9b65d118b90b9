"""Response bodies, each declared once, as the OpenAPI document states them.

The handlers build these bodies as dicts (the hot path encodes with
orjson); tests/unit/test_shapes.py decodes what the real builders return
through these shapes, so a field added to a body without its shape (or the
other way round) fails there.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from flashsale.core.statuses import (
    LEDGER_FIGURES,
    ORDER_STATUSES,
    SALE_STATUSES,
    TICKET_STATES,
    WEBHOOK_EVENT_TYPES,
    WEBHOOK_OUTCOMES,
    OrderStatus,
    PaymentStatus,
    SaleStatus,
    TicketState,
    WebhookEventType,
    WebhookOutcome,
)
from flashsale.schemas import bounds as b
from flashsale.schemas.fields import (
    AmountCents,
    AnyJson,
    Count,
    ExpiresAt,
    OrderId,
    Quantity,
    SaleId,
    Shape,
    UserId,
    choice,
    timestamp,
)


class ErrorDetail(Shape):
    code: Annotated[
        str, Meta(pattern=b.ERROR_CODE_PATTERN, description="Stable snake_case error code.")
    ]
    message: Annotated[str, Meta(description="Human-readable text.")]


class Error(Shape):
    """Envelope of every non-2xx response."""

    error: ErrorDetail


class WaitingRoomSettings(Shape):
    """(v1.1) The sale's waiting room, as created (the rate as the operator last set it)."""

    admit_per_s: Annotated[int, Meta(ge=b.ROOM_ADMIT_PER_S[0], le=b.ROOM_ADMIT_PER_S[1],
                                     description="Admissions per second for the whole sale.")]
    pass_seconds: Annotated[int, Meta(ge=b.ROOM_PASS_SECONDS[0], le=b.ROOM_PASS_SECONDS[1],
                                      description="How long a pass stays valid.")]
    oversubscribe: Annotated[float, Meta(
        ge=b.ROOM_OVERSUBSCRIBE[0], le=b.ROOM_OVERSUBSCRIBE[1],
        description="Unused passes stay below available × this.",
    )]


class Sale(Shape):
    sale_id: SaleId
    sku: Annotated[str, Meta(min_length=1, max_length=b.SKU_MAX_CHARS)]
    name: Annotated[str, Meta(min_length=1, max_length=b.NAME_MAX_CHARS)]
    price_cents: Count
    stock: Annotated[int, Meta(ge=0, description="Total ever loaded (initial plus restocks).")]
    available: Annotated[int, Meta(ge=0, description="What can still be reserved now.")]
    per_user_limit: Annotated[int, Meta(ge=1)]
    starts_at: Annotated[str, timestamp("When reservations open (UTC).")]
    ends_at: Annotated[str, timestamp("When reservations close (UTC), or null.")] | None
    hold_seconds: Annotated[int, Meta(ge=1)]
    status: Annotated[SaleStatus, choice(SALE_STATUSES, "Sale lifecycle status.")]
    waiting_room: Annotated[WaitingRoomSettings | None, Meta(
        description="(v1.1) The sale's waiting room; null: none."
    )]


class _OrderCore(Shape):
    order_id: OrderId
    sale_id: SaleId
    user_id: UserId
    quantity: Quantity
    amount_cents: AmountCents


class OrderAccepted(_OrderCore):
    """202 body: the stock is reserved."""

    status: Annotated[Literal["pending"], Meta(description="Stock reserved, not yet persisted.")]
    expires_at: ExpiresAt


class Order(_OrderCore):
    status: Annotated[OrderStatus, choice(
        ORDER_STATUSES,
        "`pending` reserved, not yet persisted; `awaiting_payment` persisted, held "
        "until `expires_at`; `paid`; `shipped`; `cancelled` by the buyer; `expired` not paid "
        "in time; `failed` final deduction failed (compensated). `cancelled`, `expired`, "
        "`failed` return the quantity."
    )]
    expires_at: ExpiresAt
    payment_id: Annotated[str, Meta(description="Payment id once payment was requested.")] | (
        None
    )
    shipment_id: Annotated[str, Meta(description="Shipment id once shipped.")] | None
    tracking_number: Annotated[str, Meta(description="Carrier tracking number once shipped.")] | (
        None
    )


class Payment(Shape):
    payment_id: Annotated[
        str, Meta(min_length=1, description="Same id on every repeat for the order.")
    ]
    order_id: OrderId
    amount_cents: AmountCents
    status: Annotated[PaymentStatus, Meta(description="Awaiting the gateway.")]


Ledger = msgspec.defstruct(
    "Ledger",
    [
        *((figure, Annotated[int, Meta(description=f"Sum of quantities: {figure}.")])
          for figure in LEDGER_FIGURES),
        ("consistent", Annotated[bool, Meta(
            description="stock == available + pending + awaiting_payment + paid + shipped, "
            "every figure is >= 0, the sale is in Redis and `sold` == awaiting_payment + paid "
            "+ shipped."
        )]),
        ("sold", Annotated[int, Meta(
            description="PostgreSQL's deducted quantity (awaiting_payment + paid + shipped "
            "when consistent)."
        )]),
        ("in_redis", Annotated[bool, Meta(
            description="The sale's counters are in Redis (false while Redis lost them and "
            "they are being rebuilt; `available` and `pending` then read 0)."
        )]),
    ],
    bases=(Shape,),
    namespace={"__doc__": "Per-sale stock reconciliation."},
)


class WebhookAck(Shape):
    """200 body of the webhook."""

    status: Annotated[Literal["ok"], Meta(
        description="The event is ours: processed (now or before), or kept."
    )]
    event_id: Annotated[str, Meta(description="The event's id.")]
    outcome: Annotated[WebhookOutcome, choice(
        WEBHOOK_OUTCOMES,
        "`paid`: the order is paid (shipping follows); `refunded`: the order was "
        "no longer payable (expired, cancelled, failed), a refund is recorded and the order "
        "stays as it was; `payment_failed`: the order stays payable; `no_change`: the payment "
        "was settled already; `duplicate`: this `event_id` was processed (or kept) before, "
        "nothing changed; `queued`: the order is not persisted yet, the event is kept durably "
        "and applied once it is (or refunded if the order is released first)."
    )]


class Settlement(Shape):
    """What the mock gateway sent to the webhook and got back."""

    payment_id: str
    event_id: Annotated[str, Meta(description="The id of the event the gateway sent.")]
    type: Annotated[WebhookEventType, choice(WEBHOOK_EVENT_TYPES, "The event type sent.")]
    webhook_status: Annotated[
        int, Meta(ge=0, description="Our webhook's HTTP status (0: not delivered).")
    ]
    webhook_response: Annotated[AnyJson, Meta(description="Our webhook's response body.")]
    attempts: Annotated[int, Meta(ge=1, description="Deliveries tried (5xx are retried).")]


class EtaRange(Shape):
    low: Annotated[int, Meta(ge=0, description="Seconds, at the soonest.")]
    high: Annotated[int, Meta(ge=0, description="Seconds, at the latest.")]


class Ticket(Shape):
    """(v1.1) A buyer's place in a sale's waiting room."""

    ticket_id: Annotated[str, Meta(min_length=1, max_length=b.PATH_ID_MAX_CHARS,
                                   description="Ticket identifier.")]
    sale_id: SaleId
    state: Annotated[TicketState, choice(
        TICKET_STATES,
        "`waiting` in the queue; `admitted`: `pass` set, valid until `pass_expires_at`; "
        "`used`: its pass reserved an order; `sold_out`: available is 0 and no hold can come "
        "back (an admitted ticket whose pass is unused too); `expired`: not polled within the "
        "grace, or the pass ran out unused.",
    )]
    position: Annotated[int, Meta(
        ge=0, description="Live tickets ahead; null unless waiting after the start."
    )] | None
    eta_seconds: Annotated[EtaRange | None, Meta(
        description="A range from the admissions measured lately; null when unknown "
        "(paused, waiting on held stock) or not waiting."
    )]
    poll_after_ms: Annotated[int, Meta(
        ge=b.ROOM_POLL_AFTER_MS[0], le=b.ROOM_POLL_AFTER_MS[1],
        description="Poll again after this; a ticket not polled within max(3 × this, 30 s) "
        "is dropped.",
    )]
    pass_: Annotated[str, Meta(
        min_length=1, max_length=b.ROOM_PASS_MAX_CHARS,
        description="Send as header `Flashsale-Pass` with the order; null unless admitted.",
    )] | None = msgspec.field(name="pass")
    pass_expires_at: Annotated[str, timestamp("When the pass runs out (UTC).")] | None


class WaitingRoomFigures(Shape):
    """(v1.1) The waiting room now (the admin GET and PATCH)."""

    waiting: Annotated[int, Meta(ge=0, description="Live tickets in the queue.")]
    admitted_outstanding: Annotated[int, Meta(ge=0, description="Passes given, not used yet.")]
    admitted_total: Annotated[int, Meta(ge=0, description="Passes given since the start.")]
    used: Annotated[int, Meta(ge=0, description="Passes that reserved an order.")]
    expired: Annotated[int, Meta(ge=0, description="Tickets dropped or passes run out.")]
    admit_per_s: Annotated[int, Meta(ge=b.ROOM_ADMIT_PER_S[0], le=b.ROOM_ADMIT_PER_S[1],
                                     description="The configured rate.")]
    measured_admit_per_s: Annotated[float, Meta(
        ge=0, description="Admissions per second measured over the last seconds."
    )]
    paused: Annotated[bool, Meta(description="No admission while true.")]


class Health(Shape):
    status: Annotated[Literal["ok"], Meta(description="The process serves.")]


class Readiness(Shape):
    status: Annotated[
        Literal["ok", "unavailable"], choice(("ok", "unavailable"), "Overall readiness.")
    ]
    checks: Annotated[dict[str, str], Meta(
        description="Per-dependency results (Redis, PostgreSQL, scripts): `ok` or `error: ...`."
    )]


RESPONSE_BODIES = (
    Error, Sale, OrderAccepted, Order, Payment, Ledger, WebhookAck, Settlement, Health, Readiness,
    Ticket, WaitingRoomFigures,
)
