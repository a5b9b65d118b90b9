"""Every status and event name of flashsale, each declared once.

The ``Literal`` types are the owners: the tuples below are read from them
(``get_args``), the request/response shapes (flashsale/schemas) use them as
field types (JSON Schema ``enum``), and code that compares a status imports
the tuple it means. mypy checks every subset against its Literal.

Order statuses, by what they mean for the sale's stock:

    pending            reserved in Redis, not yet persisted (holds stock)
    awaiting_payment   persisted, held until expires_at       (holds stock)
    paid, shipped      sold                                   (hold stock)
    cancelled, expired, failed   released: stock went back, once

Waiting-room ticket states (contract v1.1, flashsale/room/): ``TicketState``.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

OrderStatus = Literal[
    "pending", "awaiting_payment", "paid", "shipped", "cancelled", "expired", "failed"
]
ORDER_STATUSES: Final[tuple[OrderStatus, ...]] = get_args(OrderStatus)
# persisted statuses (an orders row): every status but pending; the ledger sums each
PERSISTED: Final[tuple[OrderStatus, ...]] = ORDER_STATUSES[1:]
# persisted and holding stock: the ledger's awaiting_payment + paid + shipped
HOLDING: Final[tuple[OrderStatus, ...]] = ("awaiting_payment", "paid", "shipped")
# the quantity went back to the sale (each exactly once)
RELEASED: Final[tuple[OrderStatus, ...]] = ("cancelled", "expired", "failed")
# persisted orders a cancel or an expiry may release (paid ones only the saga fails)
RELEASABLE: Final[tuple[OrderStatus, ...]] = ("awaiting_payment",)

# the ledger's figures (sums of quantities): the sale's counters, then one per persisted status
LEDGER_FIGURES: Final[tuple[str, ...]] = ("stock", "available", "pending", *PERSISTED)

SaleStatus = Literal["scheduled", "active", "sold_out", "ended"]
SALE_STATUSES: Final[tuple[SaleStatus, ...]] = get_args(SaleStatus)

# the payment as the pay endpoint answers it (the gateway's webhook settles it)
PaymentStatus = Literal["requires_payment"]
PAYMENT_STATUSES: Final[tuple[PaymentStatus, ...]] = get_args(PaymentStatus)

# the payment gateway's webhook events (api-contract.md)
WebhookEventType = Literal["payment.succeeded", "payment.failed"]
WEBHOOK_EVENT_TYPES: Final[tuple[WebhookEventType, ...]] = get_args(WebhookEventType)

# what the webhook did with an event (its 200 body's ``outcome``)
WebhookOutcome = Literal["paid", "refunded", "payment_failed", "no_change", "duplicate", "queued"]
WEBHOOK_OUTCOMES: Final[tuple[WebhookOutcome, ...]] = get_args(WebhookOutcome)

# how the mock gateway settles a payment (the admin settle endpoint's body)
SettleOutcome = Literal["succeeded", "failed"]
SETTLE_OUTCOMES: Final[tuple[SettleOutcome, ...]] = get_args(SettleOutcome)

# domain events on the events stream (flashsale/core/events.py)
DomainEventType = Literal["order_accepted", "order_paid", "order_shipped", "order_released"]
DOMAIN_EVENT_TYPES: Final[tuple[DomainEventType, ...]] = get_args(DomainEventType)

# a waiting-room ticket's state (contract v1.1, "Waiting room"; lua/room_poll-7.lua)
TicketState = Literal["waiting", "admitted", "used", "sold_out", "expired"]
TICKET_STATES: Final[tuple[TicketState, ...]] = get_args(TicketState)
