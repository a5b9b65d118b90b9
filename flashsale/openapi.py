"""OpenAPI 3.1 description of the flashsale v1 HTTP contract, served at ``GET /openapi.json``.

The document mirrors ``api-contract.md``. It is built from small helpers so that every
operation shares the same error envelope, security schemes and parameter definitions.
Every call to :func:`build_openapi` returns a fresh, independent, JSON-serialisable dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal

from flashsale import sales, validate

JSONObject = dict[str, Any]
Auth = Literal["admin", "buyer", "public"]

OPENAPI_VERSION: Final = "3.1.0"
API_VERSION: Final = "1.0.0"

# Input bounds stated by the contract, plus the upper bounds we choose to enforce.
ID_PATTERN: Final = r"^[A-Za-z0-9_.-]{1,80}$"
IDEMPOTENCY_KEY_PATTERN: Final = validate.IDEMPOTENCY_KEY_RE.pattern  # one source of truth
ERROR_CODE_PATTERN: Final = r"^[a-z][a-z0-9_]*$"
SIGNATURE_PATTERN: Final = r"^t=[0-9]+,v1=[0-9a-fA-F]{64}$"
MAX_BODY_BYTES: Final = 16 * 1024
MAX_QUANTITY: Final = 1_000_000
MAX_PRICE_CENTS: Final = sales.PRICE_MAX
MAX_STOCK: Final = sales.STOCK_MAX
MAX_PER_USER_LIMIT: Final = sales.LIMIT_MAX
MAX_HOLD_SECONDS: Final = sales.HOLD_MAX_S
CONTROL_CHARACTER: Final = r"[\x00-\x1f\x7f]"
SKU_MAX_LENGTH: Final = 64
NAME_MAX_LENGTH: Final = 200
DEFAULT_PER_USER_LIMIT: Final = 1
DEFAULT_HOLD_SECONDS: Final = 600

SALE_STATUSES: Final = ("scheduled", "active", "sold_out", "ended")
ORDER_STATUSES: Final = (
    "pending",
    "awaiting_payment",
    "paid",
    "shipped",
    "cancelled",
    "expired",
    "failed",
)
PAYMENT_STATUSES: Final = ("requires_payment",)
WEBHOOK_EVENT_TYPES: Final = ("payment.succeeded", "payment.failed")
WEBHOOK_OUTCOMES: Final = (
    "paid", "refunded", "payment_failed", "no_change", "duplicate", "queued"
)
SETTLE_OUTCOMES: Final = ("succeeded", "failed")
LEDGER_FIGURES: Final = (
    "stock",
    "available",
    "pending",
    "awaiting_payment",
    "paid",
    "shipped",
    "cancelled",
    "expired",
    "failed",
)

BUYER_SCHEME: Final = "buyerJWT"
ADMIN_SCHEME: Final = "adminToken"
JSON_MEDIA: Final = "application/json"
BODY_LIMIT_NOTE: Final = f"The raw body may be at most {MAX_BODY_BYTES // 1024} KiB " + (
    f"({MAX_BODY_BYTES} bytes); larger bodies get 400 `invalid_request`. Integers must be "
    "written as JSON integers (`2`; `2.0` is 400 `invalid_request`)."
)

_SECURITY: Final[Mapping[Auth, list[dict[str, list[str]]]]] = {
    "admin": [{ADMIN_SCHEME: []}],
    "buyer": [{BUYER_SCHEME: []}],
    "public": [],
}


# --------------------------------------------------------------------------- primitives


def _ref(kind: str, name: str) -> JSONObject:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> JSONObject:
    return _ref("schemas", name)


def _integer(minimum: int | None = None, maximum: int | None = None, **extra: Any) -> JSONObject:
    schema: JSONObject = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    schema.update(extra)
    return schema


def _string(min_length: int = 1, max_length: int | None = None, **extra: Any) -> JSONObject:
    schema: JSONObject = {"type": "string", "minLength": min_length}
    if max_length is not None:
        schema["maxLength"] = max_length
    schema.update(extra)
    return schema


def _text(max_length: int) -> JSONObject:
    """Human text: 1..max_length characters, no control characters."""
    schema = _string(max_length=max_length, description="No control characters.")
    schema["not"] = {"pattern": CONTROL_CHARACTER}
    return schema


def _nullable_string(description: str) -> JSONObject:
    return {"type": ["string", "null"], "description": description}


def _timestamp(*, nullable: bool = False, **extra: Any) -> JSONObject:
    schema: JSONObject = {
        "type": ["string", "null"] if nullable else "string",
        "format": "date-time",
    }
    schema.update(extra)
    return schema


def _enum(values: Sequence[str], description: str) -> JSONObject:
    return {"type": "string", "enum": list(values), "description": description}


def _object(
    properties: Mapping[str, JSONObject],
    *,
    required: Iterable[str] | None = None,
    description: str | None = None,
) -> JSONObject:
    """A closed object; every property is required unless ``required`` says otherwise."""
    schema: JSONObject = {"type": "object"}
    if description is not None:
        schema["description"] = description
    schema["properties"] = dict(properties)
    required_names = list(properties if required is None else required)
    if required_names:
        schema["required"] = required_names
    schema["additionalProperties"] = False
    return schema


def _json_content(schema: JSONObject, example: Any = None) -> JSONObject:
    media: JSONObject = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {JSON_MEDIA: media}


def _request_body(schema_name: str, description: str, example: Any = None) -> JSONObject:
    return {
        "required": True,
        "description": f"{description} {BODY_LIMIT_NOTE}",
        "content": _json_content(_schema(schema_name), example),
    }


def _response(
    description: str,
    schema: JSONObject | None = None,
    *,
    links: JSONObject | None = None,
    headers: JSONObject | None = None,
) -> JSONObject:
    response: JSONObject = {"description": description}
    if headers:
        response["headers"] = headers
    if schema is not None:
        response["content"] = _json_content(schema)
    if links:
        response["links"] = links
    return response


def _error_response(
    description: str, codes: Sequence[str] | None = None, *, retry_after: bool = False
) -> JSONObject:
    """An error envelope response, narrowed to ``codes`` when the contract names them."""
    schema = _schema("Error")
    if codes:
        narrowed = {"properties": {"code": {"enum": list(codes)}}}
        schema = {"allOf": [schema, {"properties": {"error": narrowed}}]}
        description = f"{description} Code: " + " | ".join(f"`{c}`" for c in codes) + "."
    headers = {"Retry-After": _ref("headers", "RetryAfter")} if retry_after else None
    return _response(description, schema, headers=headers)


def _links(param: str, targets: Mapping[str, tuple[str, str]]) -> JSONObject:
    """Links feeding ``param`` from this response body into each target operation."""
    return {
        name: {
            "operationId": operation_id,
            "parameters": {param: f"$response.body#/{param}"},
            "description": description,
        }
        for name, (operation_id, description) in targets.items()
    }


# --------------------------------------------------------------------------- common responses


def _bad_request(what: str) -> JSONObject:
    return _error_response(f"Invalid request: {what}.", ["invalid_request"])


def _unauthorized() -> JSONObject:
    return _error_response(
        "Missing, invalid or expired credentials for this endpoint.", ["unauthorized"]
    )


def _sale_not_found() -> JSONObject:
    return _error_response("No sale with this id.", ["sale_not_found"])


def _order_not_found() -> JSONObject:
    return _error_response(
        "No order with this id visible to this buyer (another buyer's order looks the same).",
        ["order_not_found"],
    )


def _unavailable(codes: Sequence[str] = ("unavailable",)) -> JSONObject:
    return _error_response(
        "A backing store is unavailable or the service is shedding load; nothing changed. "
        "Retry after the `Retry-After` delay.",
        codes,
        retry_after=True,
    )


def _operation(
    operation_id: str,
    summary: str,
    tag: str,
    auth: Auth,
    responses: Mapping[str, JSONObject],
    *,
    description: str | None = None,
    parameters: Sequence[JSONObject] = (),
    request_body: JSONObject | None = None,
) -> JSONObject:
    operation: JSONObject = {"operationId": operation_id, "summary": summary, "tags": [tag]}
    if description is not None:
        operation["description"] = description
    operation["security"] = [dict(requirement) for requirement in _SECURITY[auth]]
    if parameters:
        operation["parameters"] = list(parameters)
    if request_body is not None:
        operation["requestBody"] = request_body
    all_responses = dict(responses)
    if auth != "public":
        all_responses.setdefault("401", _unauthorized())
    operation["responses"] = dict(sorted(all_responses.items()))
    return operation


# --------------------------------------------------------------------------- components


def _schemas() -> JSONObject:
    sale_id = _string(description="Sale identifier.", pattern=ID_PATTERN)
    order_id = _string(description="Order identifier.", pattern=ID_PATTERN)
    user_id = _string(max_length=64, description="Buyer id (the JWT `sub` claim).")
    quantity = _integer(1, MAX_QUANTITY, description="Number of units.")
    amount_cents = _integer(0, description="quantity × price_cents, in cents.")
    expires_at = _timestamp(description="When an unpaid order is released (UTC).")
    order_core = {
        "order_id": order_id,
        "sale_id": sale_id,
        "user_id": user_id,
        "quantity": quantity,
        "amount_cents": amount_cents,
    }
    return {
        "Error": _object(
            {
                "error": _object(
                    {
                        "code": _string(
                            description="Stable snake_case error code.",
                            pattern=ERROR_CODE_PATTERN,
                        ),
                        "message": {"type": "string", "description": "Human-readable text."},
                    }
                )
            },
            description="Envelope of every non-2xx response.",
        ),
        "SaleCreate": _object(
            {
                "sku": _text(SKU_MAX_LENGTH),
                "name": _text(NAME_MAX_LENGTH),
                "price_cents": _integer(0, MAX_PRICE_CENTS, description="Unit price in cents."),
                "stock": _integer(0, MAX_STOCK, description="Initial stock."),
                "per_user_limit": _integer(
                    1,
                    MAX_PER_USER_LIMIT,
                    default=DEFAULT_PER_USER_LIMIT,
                    description="Max quantity one buyer may hold across accepted orders.",
                ),
                "starts_at": _timestamp(
                    description="ISO-8601 UTC (years 2000–9000); defaults to now."
                ),
                "ends_at": _timestamp(
                    nullable=True,
                    default=None,
                    description="ISO-8601 UTC after `starts_at` (years 2000–9000), or null: "
                    "no end.",
                ),
                "hold_seconds": _integer(
                    1,
                    MAX_HOLD_SECONDS,
                    default=DEFAULT_HOLD_SECONDS,
                    description="How long an unpaid order holds its stock.",
                ),
            },
            required=("sku", "name", "price_cents", "stock"),
            description="New sale. Unknown fields are rejected with 400 `invalid_request`.",
        ),
        "Restock": _object(
            {
                "quantity": _integer(
                    1,
                    MAX_QUANTITY,
                    description=f"Units to add; total stock may not exceed {MAX_STOCK}.",
                )
            },
            description="Stock to add to a sale.",
        ),
        "OrderCreate": _object(
            {"quantity": _integer(1, MAX_QUANTITY, default=1, description="Units to reserve.")},
            required=(),
            description="Order request; `{}` means quantity 1.",
        ),
        "Sale": _object(
            {
                "sale_id": sale_id,
                "sku": _string(max_length=SKU_MAX_LENGTH),
                "name": _string(max_length=NAME_MAX_LENGTH),
                "price_cents": _integer(0),
                "stock": _integer(0, description="Total ever loaded (initial plus restocks)."),
                "available": _integer(0, description="What can still be reserved now."),
                "per_user_limit": _integer(1),
                "starts_at": _timestamp(),
                "ends_at": _timestamp(nullable=True),
                "hold_seconds": _integer(1),
                "status": _enum(SALE_STATUSES, "Sale lifecycle status."),
            }
        ),
        "OrderAccepted": _object(
            {
                **order_core,
                "status": _enum(("pending",), "Stock reserved, not yet persisted."),
                "expires_at": expires_at,
            },
            description="202 body: the stock is reserved.",
        ),
        "Order": _object(
            {
                **order_core,
                "status": _enum(
                    ORDER_STATUSES,
                    "`pending` reserved, not yet persisted; `awaiting_payment` persisted, "
                    "held until `expires_at`; `paid`; `shipped`; `cancelled` by the buyer; "
                    "`expired` not paid in time; `failed` final deduction failed "
                    "(compensated). `cancelled`, `expired`, `failed` return the quantity.",
                ),
                "expires_at": expires_at,
                "payment_id": _nullable_string("Payment id once payment was requested."),
                "shipment_id": _nullable_string("Shipment id once shipped."),
                "tracking_number": _nullable_string("Carrier tracking number once shipped."),
            }
        ),
        "Payment": _object(
            {
                "payment_id": _string(description="Same id on every repeat for the order."),
                "order_id": order_id,
                "amount_cents": amount_cents,
                "status": _enum(PAYMENT_STATUSES, "Awaiting the gateway."),
            }
        ),
        "Ledger": _object(
            {
                **{
                    figure: _integer(description=f"Sum of quantities: {figure}.")
                    for figure in LEDGER_FIGURES
                },
                "consistent": {
                    "type": "boolean",
                    "description": "stock == available + pending + awaiting_payment + paid + "
                    "shipped, every figure is >= 0, the sale is in Redis and `sold` == "
                    "awaiting_payment + paid + shipped.",
                },
                "sold": _integer(
                    description="PostgreSQL's deducted quantity (awaiting_payment + paid + "
                    "shipped when consistent)."
                ),
                "in_redis": {
                    "type": "boolean",
                    "description": "The sale's counters are in Redis (false while Redis lost "
                    "them and they are being rebuilt; `available` and `pending` then read 0).",
                },
            },
            description="Per-sale stock reconciliation.",
        ),
        "WebhookEvent": _object(
            {
                "event_id": _string(description="Gateway event id; processed at most once."),
                "type": _enum(WEBHOOK_EVENT_TYPES, "Event type."),
                "payment_id": _string(),
                "order_id": _string(),
                "amount_cents": _integer(description="Amount paid, in cents."),
            },
            description="Payment gateway event.",
        ),
        "WebhookAck": _object(
            {
                "status": _enum(("ok",), "The event is ours: processed (now or before), or kept."),
                "event_id": _string(description="The event's id."),
                "outcome": _enum(
                    WEBHOOK_OUTCOMES,
                    "`paid`: the order is paid (shipping follows); `refunded`: the order was "
                    "no longer payable (expired, cancelled, failed), a refund is recorded and "
                    "the order stays as it was; `payment_failed`: the order stays payable; "
                    "`no_change`: the payment was settled already; `duplicate`: this "
                    "`event_id` was processed (or kept) before, nothing changed; `queued`: "
                    "the order is not persisted yet, the event is kept durably and applied "
                    "once it is (or refunded if the order is released first).",
                ),
            },
            description="200 body of the webhook.",
        ),
        "GatewaySettle": _object(
            {"outcome": _enum(SETTLE_OUTCOMES, "How the mock gateway settles the payment.")},
            description="Settle a payment through the mock gateway (development and tests).",
        ),
        "Settlement": _object(
            {
                "payment_id": _string(),
                "event_id": _string(description="The id of the event the gateway sent."),
                "type": _enum(WEBHOOK_EVENT_TYPES, "The event type sent."),
                "webhook_status": _integer(
                    0, description="Our webhook's HTTP status (0: not delivered)."
                ),
                "webhook_response": {"description": "Our webhook's response body."},
                "attempts": _integer(1, description="Deliveries tried (5xx are retried)."),
            },
            description="What the mock gateway sent to the webhook and got back.",
        ),
        "Health": _object({"status": _enum(("ok",), "The process serves.")}),
        "Readiness": _object(
            {
                "status": _enum(("ok", "unavailable"), "Overall readiness."),
                "checks": {
                    "type": "object",
                    "description": "Per-dependency results (Redis, PostgreSQL, scripts, "
                    "migrations).",
                },
            },
            required=("status",),
        ),
    }


def _path_param(name: str, description: str) -> JSONObject:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": _string(max_length=80, pattern=ID_PATTERN),
    }


def _parameters() -> JSONObject:
    return {
        "SaleId": _path_param("sale_id", "Sale identifier."),
        "OrderId": _path_param("order_id", "Order identifier."),
        "PaymentId": _path_param("payment_id", "Payment identifier."),
        "IdempotencyKey": {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "1–128 printable ASCII characters (0x20–0x7E), no leading or trailing "
            "space (HTTP trims those); optional, "
            "strongly recommended. "
            "A retry with the same buyer, key and body returns the first decided response "
            "(202, 409, 422) again and reserves nothing more.",
            "schema": _string(max_length=128, pattern=IDEMPOTENCY_KEY_PATTERN),
        },
        "FlashsaleSignature": {
            "name": "Flashsale-Signature",
            "in": "header",
            "required": True,
            "description": "`t=<unix seconds>,v1=<hex HMAC-SHA256(FLASHSALE_WEBHOOK_SECRET, "
            '"<t>.<raw body>")>`; `t` must be within 300 s of now.',
            "schema": _string(pattern=SIGNATURE_PATTERN),
        },
    }


def _security_schemes() -> JSONObject:
    return {
        BUYER_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "HS256 JWT signed with FLASHSALE_JWT_SECRET; `sub` = user id "
            "(1–64 chars), `exp` required. Mint one with `flashsale token USER_ID`.",
        },
        ADMIN_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "The FLASHSALE_ADMIN_TOKEN value.",
        },
    }


def _components() -> JSONObject:
    return {
        "schemas": _schemas(),
        "parameters": _parameters(),
        "headers": {
            "RetryAfter": {
                "required": True,
                "description": "Seconds to wait before retrying.",
                "schema": _integer(0),
            }
        },
        "securitySchemes": _security_schemes(),
    }


# --------------------------------------------------------------------------- paths


def _sale_paths() -> JSONObject:
    sale_id = _ref("parameters", "SaleId")
    created_links = _links(
        "sale_id",
        {
            "GetSale": ("getSale", "Read the created sale."),
            "RestockSale": ("restockSale", "Add stock to the created sale."),
            "GetLedger": ("getLedger", "Reconcile the created sale."),
            "CreateOrder": ("createOrder", "Order from the created sale."),
        },
    )
    return {
        "/api/v1/sales": {
            "post": _operation(
                "createSale",
                "Create a sale",
                "sales",
                "admin",
                {
                    "201": _response("The created sale.", _schema("Sale"), links=created_links),
                    "400": _bad_request("malformed JSON, wrong types, bounds or unknown fields"),
                    "503": _unavailable(),
                },
                request_body=_request_body(
                    "SaleCreate",
                    "The sale to create.",
                    {
                        "sku": "SKU-1",
                        "name": "Limited sneaker",
                        "price_cents": 12900,
                        "stock": 100,
                        "per_user_limit": 2,
                        "ends_at": None,
                    },
                ),
            )
        },
        "/api/v1/sales/{sale_id}": {
            "get": _operation(
                "getSale",
                "Read a sale",
                "sales",
                "public",
                {
                    "200": _response("The sale.", _schema("Sale")),
                    "404": _sale_not_found(),
                    "503": _unavailable(),
                },
                parameters=[sale_id],
            )
        },
        "/api/v1/sales/{sale_id}/restock": {
            "post": _operation(
                "restockSale",
                "Add stock to a sale",
                "sales",
                "admin",
                {
                    "200": _response("The sale after the restock.", _schema("Sale")),
                    "400": _bad_request("malformed JSON, quantity out of bounds, unknown fields"),
                    "404": _sale_not_found(),
                    "409": _error_response(
                        f"The sale's total stock would exceed {MAX_STOCK}; nothing changed.",
                        ["stock_limit_exceeded"],
                    ),
                    "503": _unavailable(),
                },
                parameters=[sale_id],
                request_body=_request_body("Restock", "Units to add.", {"quantity": 50}),
            )
        },
        "/api/v1/admin/sales/{sale_id}/ledger": {
            "get": _operation(
                "getLedger",
                "Stock ledger of a sale",
                "admin",
                "admin",
                {
                    "200": _response("The ledger.", _schema("Ledger")),
                    "404": _sale_not_found(),
                    "503": _unavailable(),
                },
                parameters=[sale_id],
            )
        },
    }


def _order_paths() -> JSONObject:
    order_id = _ref("parameters", "OrderId")
    accepted_links = _links(
        "order_id",
        {
            "GetOrder": ("getOrder", "Read the accepted order."),
            "CancelOrder": ("cancelOrder", "Cancel the accepted order."),
            "PayOrder": ("payOrder", "Request payment of the accepted order."),
        },
    )
    return {
        "/api/v1/sales/{sale_id}/orders": {
            "post": _operation(
                "createOrder",
                "Reserve stock: place an order",
                "orders",
                "buyer",
                {
                    "202": _response(
                        "Accepted: stock reserved.", _schema("OrderAccepted"), links=accepted_links
                    ),
                    "400": _bad_request(
                        "malformed JSON, empty or non-object body, wrong types, quantity out of "
                        "bounds, unknown fields, body over 16 KiB, malformed Idempotency-Key"
                    ),
                    "404": _sale_not_found(),
                    "409": _error_response(
                        "Not accepted: not enough available, this buyer's per-user limit "
                        "would be passed, or the sale is not active.",
                        ["sold_out", "limit_exceeded", "sale_not_active"],
                    ),
                    "422": _error_response(
                        "The Idempotency-Key was used by this buyer with a different body or sale.",
                        ["idempotency_key_reused"],
                    ),
                    "429": _error_response(
                        "Too many requests; retry after `Retry-After`.",
                        ["rate_limited"],
                        retry_after=True,
                    ),
                    "503": _unavailable(("overloaded", "unavailable")),
                },
                description="Only decided outcomes (202, 409, 422) are remembered under an "
                "Idempotency-Key; 429/503 are not, and reserve nothing.",
                parameters=[_ref("parameters", "SaleId"), _ref("parameters", "IdempotencyKey")],
                request_body=_request_body(
                    "OrderCreate", "A JSON object; `{}` means quantity 1.", {"quantity": 1}
                ),
            )
        },
        "/api/v1/orders/{order_id}": {
            "get": _operation(
                "getOrder",
                "Read one of my orders",
                "orders",
                "buyer",
                {
                    "200": _response("The order.", _schema("Order")),
                    "404": _order_not_found(),
                    "503": _unavailable(),
                },
                parameters=[order_id],
            )
        },
        "/api/v1/orders/{order_id}/cancel": {
            "post": _operation(
                "cancelOrder",
                "Cancel one of my orders",
                "orders",
                "buyer",
                {
                    "200": _response("The order, now `cancelled`.", _schema("Order")),
                    "404": _order_not_found(),
                    "409": _error_response(
                        "The order is not `pending` or `awaiting_payment`.",
                        ["order_not_cancellable"],
                    ),
                    "503": _unavailable(),
                },
                parameters=[order_id],
            )
        },
        "/api/v1/orders/{order_id}/pay": {
            "post": _operation(
                "payOrder",
                "Request payment of one of my orders",
                "orders",
                "buyer",
                {
                    "201": _response(
                        "Payment requested (same `payment_id` on repeat); the order's status "
                        "changes only through the gateway webhook.",
                        _schema("Payment"),
                        links=_links(
                            "payment_id",
                            {
                                "SettlePayment": (
                                    "settlePayment",
                                    "Settle the payment through the mock gateway.",
                                )
                            },
                        ),
                    ),
                    "400": _bad_request(
                        "a body other than none or `{}` (amount, status and buyer are "
                        "server-owned)"
                    ),
                    "404": _order_not_found(),
                    "409": _error_response(
                        "The order is not `pending` or `awaiting_payment` (or its hold has "
                        "expired).",
                        ["order_not_payable"],
                    ),
                    "503": _unavailable(),
                },
                description="Takes no body (or `{}`). When the payment gateway fails or its "
                "circuit breaker is open the answer is 503 with `Retry-After`; retrying "
                "returns the same `payment_id`.",
                parameters=[order_id],
            )
        },
    }


def _webhook_paths() -> JSONObject:
    return {
        "/api/v1/payments/webhook": {
            "post": _operation(
                "paymentWebhook",
                "Payment gateway webhook",
                "payments",
                "public",
                {
                    "200": _response(
                        "Processed, kept for an order not persisted yet, or an already "
                        "processed `event_id`.", _schema("WebhookAck")
                    ),
                    "400": _error_response(
                        "Bad or missing signature, timestamp more than 300 s from now "
                        "(`invalid_signature`), or malformed body, unknown payment or wrong "
                        "amount (`invalid_request`); nothing changed.",
                        ["invalid_signature", "invalid_request"],
                    ),
                    "503": _unavailable(),
                },
                description="Authenticated by the `Flashsale-Signature` HMAC, not a bearer "
                "token. `payment.succeeded` with the right amount on a payable order makes it "
                "`paid` (then `shipped`); on an `expired` or `cancelled` order it records a "
                "refund instead. `payment.failed` leaves the order payable until it expires. "
                "An event for an order still `pending` (not yet persisted) is kept durably "
                "(outcome `queued`) and applied exactly once when the consumer persists the "
                "order, or refunded when the order is released first. 503 only when "
                "PostgreSQL cannot take the event; the gateway retries.",
                parameters=[_ref("parameters", "FlashsaleSignature")],
                request_body=_request_body("WebhookEvent", "The gateway event."),
            )
        }
    }


def _gateway_paths() -> JSONObject:
    return {
        "/api/v1/admin/gateway/payments/{payment_id}/settle": {
            "post": _operation(
                "settlePayment",
                "Settle a payment through the mock gateway",
                "admin",
                "admin",
                {
                    "200": _response(
                        "The gateway sent the signed webhook; its answer is included.",
                        _schema("Settlement"),
                    ),
                    "400": _bad_request("malformed JSON, unknown fields or unknown outcome"),
                    "404": _error_response("No payment with this id.", ["payment_not_found"]),
                    "503": _unavailable(),
                },
                description="Development and tests only (an addition to the contract): the "
                "in-process mock gateway sends `POST /api/v1/payments/webhook` an event "
                "`payment.succeeded` or `payment.failed` for this payment, signed with "
                "FLASHSALE_WEBHOOK_SECRET exactly as a real gateway would, retrying a 5xx "
                "answer a bounded number of times.",
                parameters=[_ref("parameters", "PaymentId")],
                request_body=_request_body(
                    "GatewaySettle", "The outcome to report.", {"outcome": "succeeded"}
                ),
            )
        }
    }


def _operations_paths() -> JSONObject:
    return {
        "/healthz": {
            "get": _operation(
                "healthz",
                "Liveness",
                "operations",
                "public",
                {"200": _response("The process serves.", _schema("Health"))},
            )
        },
        "/readyz": {
            "get": _operation(
                "readyz",
                "Readiness",
                "operations",
                "public",
                {
                    "200": _response(
                        "Redis and PostgreSQL answer, scripts are loaded, migrations current.",
                        _schema("Readiness"),
                    ),
                    "503": _response("Not ready.", _schema("Readiness")),
                },
            )
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "Prometheus metrics",
                "operations",
                "public",
                {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            )
        },
        "/openapi.json": {
            "get": _operation(
                "openapi",
                "This OpenAPI document",
                "operations",
                "public",
                {"200": _response("OpenAPI 3.1 document.", {"type": "object"})},
            )
        },
    }


def _operator_paths() -> JSONObject:
    """Contract v1.1: the kill switch, the live event stream, the dashboard page."""
    sale_id = _ref("parameters", "SaleId")
    return {
        "/api/v1/sales/{sale_id}/end": {
            "post": _operation(
                "endSale",
                "End a sale now",
                "sales",
                "admin",
                {
                    "200": _response(
                        "The sale, `status` `ended` and `ends_at` now; an ended sale unchanged.",
                        _schema("Sale"),
                    ),
                    "404": _sale_not_found(),
                    "503": _unavailable(),
                },
                description="The kill switch (no body): from the response on, reservations "
                "get `409 sale_not_active` on every front process; orders already held stay "
                "payable until they expire. Ending an ended sale returns it unchanged.",
                parameters=[sale_id],
            )
        },
        "/api/v1/admin/events": {
            "get": _operation(
                "streamAdminEvents",
                "Live figures of every live sale (Server-Sent Events)",
                "admin",
                "admin",
                {
                    "200": {
                        "description": "`text/event-stream`: at least one `event: figures` a "
                        "second, its `data` one JSON object with `time`, `sales` (per live "
                        "sale: `sale`, `figures` as in the ledger, `consistent`, `stream` "
                        "`{lag, pending_entries, dead_letters}`), `totals`, `workers`, "
                        "`alive` (workers per role) and `series` (reservations per second by "
                        "outcome, p50/p99 latency in ms, over the last minutes). The stream "
                        "ends after an hour or at shutdown; reconnect.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "503": _unavailable(("overloaded",)),
                },
                description="Bearer header auth, so read it with fetch() (EventSource "
                "cannot send one). A bounded number of streams per process.",
            )
        },
        "/admin": {
            "get": _operation(
                "adminDashboard",
                "The operator's live dashboard (HTML)",
                "admin",
                "public",
                {
                    "200": {
                        "description": "The page; the admin token is entered in it (kept in "
                        "session storage, sent as a bearer header, never in a URL or cookie).",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            )
        },
    }


# --------------------------------------------------------------------------- waiting room (v1.1)
# One block (issue 12): its schemas, the sale's `waiting_room`, the pass on createOrder and
# the room's paths are added to the document by _add_waiting_room.

TICKET_STATES: Final = ("waiting", "admitted", "used", "sold_out", "expired")


def _waiting_room_schemas() -> JSONObject:
    from flashsale.room import settings as rs

    settings_props = {
        "admit_per_s": _integer(rs.ADMIT_PER_S_MIN, rs.ADMIT_PER_S_MAX,
                                description="Admissions per second for the whole sale."),
        "pass_seconds": _integer(rs.PASS_SECONDS_MIN, rs.PASS_SECONDS_MAX,
                                 default=rs.PASS_SECONDS_DEFAULT,
                                 description="How long a pass stays valid."),
        "oversubscribe": {"type": "number", "minimum": rs.OVERSUBSCRIBE_MIN,
                          "maximum": rs.OVERSUBSCRIBE_MAX, "default": rs.OVERSUBSCRIBE_DEFAULT,
                          "description": "Unused passes stay below available x this."},
    }
    count = _integer(0)
    return {
        "WaitingRoomCreate": _object(settings_props, required=("admit_per_s",),
                                     description="A sale's waiting room."),
        "WaitingRoom": _object(settings_props, description="A sale's waiting room."),
        "Ticket": _object(
            {
                "ticket_id": _string(max_length=80),
                "sale_id": _string(description="Sale identifier.", pattern=ID_PATTERN),
                "state": _enum(TICKET_STATES, "The ticket's state."),
                "position": {"type": ["integer", "null"], "minimum": 0,
                             "description": "Live tickets ahead; null unless waiting after "
                             "the start."},
                "eta_seconds": {
                    "oneOf": [_object({"low": _integer(0), "high": _integer(0)}),
                              {"type": "null"}],
                    "description": "A range from the admissions measured lately; null when "
                    "unknown (paused, waiting on held stock) or not waiting.",
                },
                "poll_after_ms": _integer(1000, 30000, description="Poll again after this; "
                                          "a ticket not polled within max(3 x this, 30 s) "
                                          "is dropped."),
                "pass": {"type": ["string", "null"],
                         "description": "Send as header `Flashsale-Pass` with the order."},
                "pass_expires_at": _timestamp(nullable=True),
            },
            description="A buyer's place in a sale's waiting room.",
        ),
        "WaitingRoomFigures": _object(
            {
                "waiting": count, "admitted_outstanding": count, "admitted_total": count,
                "used": count, "expired": count,
                "admit_per_s": _integer(rs.ADMIT_PER_S_MIN, rs.ADMIT_PER_S_MAX),
                "measured_admit_per_s": {"type": "number", "minimum": 0},
                "paused": {"type": "boolean"},
            },
            description="The waiting room now.",
        ),
        "WaitingRoomPatch": _object(
            {"admit_per_s": _integer(rs.ADMIT_PER_S_MIN, rs.ADMIT_PER_S_MAX),
             "paused": {"type": "boolean"}},
            required=(), description="Change the rate, pause or resume.",
        ),
    }


def _waiting_room_paths() -> JSONObject:
    sale_id = _ref("parameters", "SaleId")
    ticket_id = _path_param("ticket_id", "Ticket identifier.")
    room_off = _error_response("The sale has no waiting room.", ["waiting_room_off"])
    return {
        "/api/v1/sales/{sale_id}/queue": {
            "post": _operation(
                "joinQueue", "Take a ticket in the sale's waiting room", "waiting room", "buyer",
                {
                    "201": _response("A new ticket.", _schema("Ticket")),
                    "200": _response("The buyer's existing ticket.", _schema("Ticket")),
                    "404": _sale_not_found(),
                    "409": _error_response(
                        "No room on this sale, nothing can be had, or the sale ended.",
                        ["waiting_room_off", "sold_out", "sale_not_active"]),
                    "429": _error_response("Too many requests.", ["rate_limited"],
                                           retry_after=True),
                    "503": _unavailable(("overloaded", "unavailable")),
                },
                description="No body. One ticket per buyer and sale.",
                parameters=[sale_id],
            )
        },
        "/api/v1/sales/{sale_id}/queue/{ticket_id}": {
            "get": _operation(
                "getTicket", "Read (and keep alive) my ticket", "waiting room", "buyer",
                {
                    "200": _response("The ticket.", _schema("Ticket")),
                    "404": _error_response("No such ticket of this buyer.",
                                           ["ticket_not_found", "sale_not_found"]),
                    "429": _error_response("Too many requests.", ["rate_limited"],
                                           retry_after=True),
                    "503": _unavailable(),
                },
                description="Polling is the heartbeat: poll again after `poll_after_ms`.",
                parameters=[sale_id, ticket_id],
            )
        },
        "/api/v1/admin/sales/{sale_id}/waiting-room": {
            "get": _operation(
                "getWaitingRoom", "The waiting room's figures", "admin", "admin",
                {"200": _response("The figures.", _schema("WaitingRoomFigures")),
                 "404": _sale_not_found(), "409": room_off, "503": _unavailable()},
                parameters=[sale_id],
            ),
            "patch": _operation(
                "patchWaitingRoom", "Pause, resume, change the rate", "admin", "admin",
                {"200": _response("The figures.", _schema("WaitingRoomFigures")),
                 "400": _bad_request("wrong types, out of bounds, unknown fields"),
                 "404": _sale_not_found(), "409": room_off, "503": _unavailable()},
                parameters=[sale_id],
                request_body=_request_body("WaitingRoomPatch", "The fields to change.",
                                           {"paused": True}),
            ),
        },
        "/sales/{sale_id}/wait": {
            "get": _operation(
                "waitingPage", "The waiting page (HTML)", "waiting room", "public",
                {"200": {"description": "The page: it takes the buyer's token, joins, shows "
                         "position and ETA, and reserves with the pass once admitted.",
                         "content": {"text/html": {"schema": {"type": "string"}}}},
                 "404": _sale_not_found()},
                parameters=[sale_id],
            )
        },
    }


def _add_waiting_room(doc: JSONObject) -> JSONObject:
    comps = doc["components"]
    comps["schemas"].update(_waiting_room_schemas())
    comps["schemas"]["SaleCreate"]["properties"]["waiting_room"] = {
        "oneOf": [_schema("WaitingRoomCreate"), {"type": "null"}], "default": None,
        "description": "(v1.1) A waiting room in front of the sale; null: none.",
    }
    sale = comps["schemas"]["Sale"]
    sale["properties"]["waiting_room"] = {"oneOf": [_schema("WaitingRoom"), {"type": "null"}]}
    sale["required"] = [*sale["required"], "waiting_room"]
    comps["parameters"]["FlashsalePass"] = {
        "name": "Flashsale-Pass", "in": "header", "required": False,
        "description": "(v1.1) The pass of an admitted waiting-room ticket; required on a "
        "sale with a waiting room.",
        "schema": _string(max_length=512),
    }
    order = doc["paths"]["/api/v1/sales/{sale_id}/orders"]["post"]
    order["parameters"].append(_ref("parameters", "FlashsalePass"))
    order["responses"]["403"] = _error_response(
        "The sale has a waiting room and no valid pass was sent (missing, forged, expired, "
        "another buyer's or another sale's, or already used for an order).", ["pass_required"])
    order["responses"] = dict(sorted(order["responses"].items()))
    doc["paths"].update(_waiting_room_paths())
    doc["tags"].append({"name": "waiting room", "description": "(v1.1) The waiting room."})
    return doc


def build_openapi() -> dict[str, Any]:
    """Return the OpenAPI 3.1.0 document of every endpoint of the v1 contract."""
    return _add_waiting_room({
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "flashsale",
            "version": API_VERSION,
            "summary": "Flash-sale inventory service.",
            "description": "Every non-2xx response body is "
            '`{"error": {"code": "<snake_case>", "message": "<text>"}}` with '
            "`Content-Type: application/json` (except `GET /readyz` 503). Buyer endpoints take "
            "a JWT bearer token, admin endpoints the admin token; a buyer never sees another "
            "buyer's order (404, as for an unknown id). Every response carries `X-Request-Id` "
            "(the request's own when it sends 1-128 characters of `[A-Za-z0-9._-]`).",
        },
        "tags": [
            {"name": "sales", "description": "Sales (admin writes, public reads)."},
            {"name": "orders", "description": "Buyer orders."},
            {"name": "admin", "description": "Operator views."},
            {"name": "payments", "description": "Payment gateway callbacks."},
            {"name": "operations", "description": "Health, readiness, metrics, this document."},
        ],
        "paths": {
            **_sale_paths(),
            **_order_paths(),
            **_webhook_paths(),
            **_gateway_paths(),
            **_operations_paths(),
            **_operator_paths(),
        },
        "components": _components(),
    })
