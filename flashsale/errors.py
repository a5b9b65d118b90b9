"""Domain errors. Each maps to one HTTP status and contract error code.

The docstring of each class is its default message (procrastinate's habit);
one middleware turns them into the contract's error body.
"""

from __future__ import annotations


class FlashsaleError(Exception):
    """Something went wrong."""

    status: int = 500
    code: str = "internal_error"
    retry_after_s: int | None = None

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or self.code).strip()
        super().__init__(self.message)


class InvalidRequest(FlashsaleError):
    """The request is malformed."""

    status, code = 400, "invalid_request"


class Unauthorized(FlashsaleError):
    """Missing, invalid or expired credentials."""

    status, code = 401, "unauthorized"


class PassRequired(FlashsaleError):
    """This sale has a waiting room: send the pass it gave you (header Flashsale-Pass)."""

    status, code = 403, "pass_required"


class TicketNotFound(FlashsaleError):
    """No such ticket."""

    status, code = 404, "ticket_not_found"


class WaitingRoomOff(FlashsaleError):
    """This sale has no waiting room."""

    status, code = 409, "waiting_room_off"


class SaleNotFound(FlashsaleError):
    """No such sale."""

    status, code = 404, "sale_not_found"


class OrderNotFound(FlashsaleError):
    """No such order."""

    status, code = 404, "order_not_found"


class SoldOut(FlashsaleError):
    """Not enough stock is available."""

    status, code = 409, "sold_out"


class LimitExceeded(FlashsaleError):
    """This order would pass the sale's per-user limit."""

    status, code = 409, "limit_exceeded"


class SaleNotActive(FlashsaleError):
    """The sale is not active now."""

    status, code = 409, "sale_not_active"


class OrderNotCancellable(FlashsaleError):
    """The order can no longer be cancelled."""

    status, code = 409, "order_not_cancellable"


class OrderNotPayable(FlashsaleError):
    """The order can no longer be paid."""

    status, code = 409, "order_not_payable"


class StockLimitExceeded(FlashsaleError):
    """The sale's total stock would pass the maximum."""

    status, code = 409, "stock_limit_exceeded"


class IdempotencyKeyReused(FlashsaleError):
    """This idempotency key was used with a different request."""

    status, code = 422, "idempotency_key_reused"


class RequestTimeout(FlashsaleError):
    """The request was not received in time."""

    status, code = 408, "request_timeout"


class RateLimited(FlashsaleError):
    """Too many requests; retry later."""

    status, code, retry_after_s = 429, "rate_limited", 1


class Overloaded(FlashsaleError):
    """The service is overloaded; nothing was reserved. Retry later."""

    status, code, retry_after_s = 503, "overloaded", 1


class Unavailable(FlashsaleError):
    """A backend is unavailable; nothing was changed. Retry later."""

    status, code, retry_after_s = 503, "unavailable", 2


class InvalidSignature(FlashsaleError):
    """The webhook signature is missing, malformed, stale or wrong."""

    status, code = 400, "invalid_signature"


class PaymentNotFound(FlashsaleError):
    """No such payment."""

    status, code = 404, "payment_not_found"
