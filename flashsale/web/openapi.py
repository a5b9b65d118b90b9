"""OpenAPI 3.1 description of the flashsale HTTP contract, served at ``GET /openapi.json``.

The document mirrors ``api-contract.md``. Its schemas are generated from the
shapes the server decodes and answers with (flashsale/schemas: msgspec
Structs) and its bounds come from flashsale/schemas/bounds.py, so the
document and the server cannot disagree on a field, a bound or a status
name; flashsale/web/openapi_parts.py builds those components and the
answers every operation shares. This module only assembles the paths.

Adding an endpoint: declare its bodies in flashsale/schemas (list them in
``REQUEST_BODIES`` / ``RESPONSE_BODIES``), write its path with
:func:`_operation` in a ``_..._paths()`` function, and join that function in
:func:`build_openapi`. 401 (authenticated), 429 (buyer), 408 and the
connection cap's 503 are added to every operation by :func:`_operation`.
Every call to :func:`build_openapi` returns a fresh, independent, JSON-serialisable dict.
"""

from __future__ import annotations

from typing import Any

from flashsale.web.openapi_parts import (
    API_VERSION,
    CONNECTION_CAP_NOTE,
    MAX_STOCK,
    OPENAPI_VERSION,
    JSONObject,
    _bad_request,
    _components,
    _error_response,
    _links,
    _operation,
    _order_not_found,
    _path_param,
    _ref,
    _request_body,
    _response,
    _retry_after,
    _sale_not_found,
    _schema,
    _unavailable,
)

SALE_EXAMPLE = {"sku": "SKU-1", "name": "Limited sneaker", "price_cents": 12900, "stock": 100,
                "per_user_limit": 2, "ends_at": None}


def _text(media: str, description: str) -> JSONObject:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


def _sale_paths() -> JSONObject:
    sale_id = _ref("parameters", "SaleId")
    created_links = _links("sale_id", {
        "GetSale": ("getSale", "Read the created sale."),
        "RestockSale": ("restockSale", "Add stock to the created sale."),
        "GetLedger": ("getLedger", "Reconcile the created sale."),
        "CreateOrder": ("createOrder", "Order from the created sale."),
    })
    return {
        "/api/v1/sales": {"post": _operation(
            "createSale", "Create a sale", "sales", "admin",
            {"201": _response("The created sale.", _schema("Sale"), links=created_links),
             "400": _bad_request("malformed JSON, wrong types, bounds or unknown fields")},
            request_body=_request_body("SaleCreate", "The sale to create.", SALE_EXAMPLE),
        )},
        "/api/v1/sales/{sale_id}": {"get": _operation(
            "getSale", "Read a sale", "sales", "public",
            {"200": _response("The sale.", _schema("Sale")), "404": _sale_not_found()},
            parameters=[sale_id],
        )},
        "/api/v1/sales/{sale_id}/restock": {"post": _operation(
            "restockSale", "Add stock to a sale", "sales", "admin",
            {"200": _response("The sale after the restock.", _schema("Sale")),
             "400": _bad_request("malformed JSON, quantity out of bounds, unknown fields"),
             "404": _sale_not_found(),
             "409": _error_response(
                 f"The sale's total stock would exceed {MAX_STOCK}; nothing changed.",
                 ["stock_limit_exceeded"])},
            parameters=[sale_id],
            request_body=_request_body("Restock", "Units to add.", {"quantity": 50}),
        )},
        "/api/v1/admin/sales/{sale_id}/ledger": {"get": _operation(
            "getLedger", "Stock ledger of a sale", "admin", "admin",
            {"200": _response("The ledger.", _schema("Ledger")), "404": _sale_not_found()},
            parameters=[sale_id],
        )},
    }


def _order_paths() -> JSONObject:
    order_id = _ref("parameters", "OrderId")
    accepted_links = _links("order_id", {
        "GetOrder": ("getOrder", "Read the accepted order."),
        "CancelOrder": ("cancelOrder", "Cancel the accepted order."),
        "PayOrder": ("payOrder", "Request payment of the accepted order."),
    })
    settle_link = _links("payment_id", {
        "SettlePayment": ("settlePayment", "Settle the payment through the mock gateway."),
    })
    return {
        "/api/v1/sales/{sale_id}/orders": {"post": _operation(
            "createOrder", "Reserve stock: place an order", "orders", "buyer",
            {"202": _response(
                "Accepted: stock reserved.", _schema("OrderAccepted"), links=accepted_links),
             "400": _bad_request(
                 "malformed JSON, empty or non-object body, wrong types, quantity out of "
                 "bounds, unknown fields, body over 16 KiB, malformed Idempotency-Key"),
             "404": _sale_not_found(),
             "409": _error_response(
                 "Not accepted: not enough available, this buyer's per-user limit would be "
                 "passed, or the sale is not active.",
                 ["sold_out", "limit_exceeded", "sale_not_active"]),
             "403": _error_response(
                 "(v1.1) The sale has a waiting room and no valid pass was sent (missing, "
                 "forged, expired, another buyer's or another sale's, or already used for an "
                 "order).", ["pass_required"]),
             "422": _error_response(
                 "The Idempotency-Key was used by this buyer with a different body or sale.",
                 ["idempotency_key_reused"]),
             "503": _unavailable(("overloaded",))},
            description="Only decided outcomes (202, 409, 422) are remembered under an "
            "Idempotency-Key; 403/429/503 are not, and reserve nothing.",
            parameters=[_ref("parameters", "SaleId"), _ref("parameters", "IdempotencyKey"),
                        _ref("parameters", "FlashsalePass")],
            request_body=_request_body(
                "OrderCreate", "A JSON object; `{}` means quantity 1.", {"quantity": 1}),
        )},
        "/api/v1/orders/{order_id}": {"get": _operation(
            "getOrder", "Read one of my orders", "orders", "buyer",
            {"200": _response("The order.", _schema("Order")), "404": _order_not_found()},
            parameters=[order_id],
        )},
        "/api/v1/orders/{order_id}/cancel": {"post": _operation(
            "cancelOrder", "Cancel one of my orders", "orders", "buyer",
            {"200": _response("The order, now `cancelled`.", _schema("Order")),
             "404": _order_not_found(),
             "409": _error_response("The order is not `pending` or `awaiting_payment`.",
                                    ["order_not_cancellable"])},
            parameters=[order_id],
        )},
        "/api/v1/orders/{order_id}/pay": {"post": _operation(
            "payOrder", "Request payment of one of my orders", "orders", "buyer",
            {"201": _response(
                "Payment requested (same `payment_id` on repeat); the order's status changes "
                "only through the gateway webhook.", _schema("Payment"), links=settle_link),
             "400": _bad_request(
                 "a body other than none or `{}` (amount, status and buyer are server-owned)"),
             "404": _order_not_found(),
             "409": _error_response(
                 "The order is not `pending` or `awaiting_payment` (or its hold has expired).",
                 ["order_not_payable"])},
            description="Takes no body (or `{}`). When the payment gateway fails or its "
            "circuit breaker is open the answer is 503 with `Retry-After`; retrying returns "
            "the same `payment_id`.",
            parameters=[order_id],
        )},
    }


def _payment_paths() -> JSONObject:
    return {
        "/api/v1/payments/webhook": {"post": _operation(
            "paymentWebhook", "Payment gateway webhook", "payments", "public",
            {"200": _response(
                "Processed, kept for an order not persisted yet, or an already processed "
                "`event_id`.", _schema("WebhookAck")),
             "400": _error_response(
                 "Bad or missing signature, timestamp more than 300 s from now "
                 "(`invalid_signature`), or malformed body, unknown payment or wrong amount "
                 "(`invalid_request`); nothing changed.",
                 ["invalid_signature", "invalid_request"])},
            description="Authenticated by the `Flashsale-Signature` HMAC, not a bearer token. "
            "`payment.succeeded` with the right amount on a payable order makes it `paid` "
            "(then `shipped`); on an `expired` or `cancelled` order it records a refund "
            "instead. `payment.failed` leaves the order payable until it expires. An event for "
            "an order still `pending` (not yet persisted) is kept durably (outcome `queued`) "
            "and applied exactly once when the consumer persists the order, or refunded when "
            "the order is released first. 503 only when PostgreSQL cannot take the event; the "
            "gateway retries.",
            parameters=[_ref("parameters", "FlashsaleSignature")],
            request_body=_request_body("WebhookEvent", "The gateway event."),
        )},
        "/api/v1/admin/gateway/payments/{payment_id}/settle": {"post": _operation(
            "settlePayment", "Settle a payment through the mock gateway", "admin", "admin",
            {"200": _response("The gateway sent the signed webhook; its answer is included.",
                              _schema("Settlement")),
             "400": _bad_request("malformed JSON, unknown fields or unknown outcome"),
             "404": _error_response("No payment with this id.", ["payment_not_found"])},
            description="Development and tests only (an addition to the contract): the "
            "in-process mock gateway sends `POST /api/v1/payments/webhook` an event "
            "`payment.succeeded` or `payment.failed` for this payment, signed with "
            "FLASHSALE_WEBHOOK_SECRET exactly as a real gateway would, retrying a 5xx answer a "
            "bounded number of times.",
            parameters=[_ref("parameters", "PaymentId")],
            request_body=_request_body(
                "GatewaySettle", "The outcome to report.", {"outcome": "succeeded"}),
        )},
    }


def _operations_paths() -> JSONObject:
    return {
        "/healthz": {"get": _operation(
            "healthz", "Liveness", "operations", "public",
            {"200": _response("The process serves.", _schema("Health"))},
        )},
        "/readyz": {"get": _operation(
            "readyz", "Readiness", "operations", "public",
            {"200": _response(
                "Redis and PostgreSQL answer, scripts are loaded, migrations current.",
                _schema("Readiness")),
             "503": _response(
                 "Not ready (the Readiness body), with `Retry-After`; or the connection cap's "
                 f"`unavailable` error. {CONNECTION_CAP_NOTE}",
                 {"anyOf": [_schema("Readiness"), _schema("Error")]}, headers=_retry_after())},
        )},
        "/metrics": {"get": _operation(
            "metrics", "Prometheus metrics", "operations", "public",
            {"200": _text("text/plain", "Prometheus text exposition format.")},
        )},
        "/openapi.json": {"get": _operation(
            "openapi", "This OpenAPI document", "operations", "public",
            {"200": _response("OpenAPI 3.1 document.", {"type": "object"})},
        )},
    }


def _operator_paths() -> JSONObject:
    """Contract v1.1: the kill switch, the live event stream, the dashboard page."""
    return {
        "/api/v1/sales/{sale_id}/end": {"post": _operation(
            "endSale", "End a sale now", "sales", "admin",
            {"200": _response(
                "The sale, `status` `ended` and `ends_at` now; an ended sale unchanged.",
                _schema("Sale")),
             "404": _sale_not_found()},
            description="The kill switch (no body): from the response on, reservations get "
            "`409 sale_not_active` on every front process; orders already held stay payable "
            "until they expire. Ending an ended sale returns it unchanged.",
            parameters=[_ref("parameters", "SaleId")],
        )},
        "/api/v1/admin/events": {"get": _operation(
            "streamAdminEvents", "Live figures of every live sale (Server-Sent Events)",
            "admin", "admin",
            {"200": _text(
                "text/event-stream",
                "`text/event-stream`: at least one `event: figures` a second, its `data` one "
                "JSON object with `time`, `sales` (per live sale: `sale`, `figures` as in the "
                "ledger, `consistent`, `stream` `{lag, pending_entries, dead_letters}`), "
                "`totals`, `workers`, `alive` (workers per role) and `series` (reservations "
                "per second by outcome, p50/p99 latency in ms, over the last minutes). The "
                "stream ends after an hour or at shutdown; reconnect."),
             "503": _unavailable(("overloaded",))},
            description="Bearer header auth, so read it with fetch() (EventSource cannot send "
            "one). A bounded number of streams per process (`overloaded` past it).",
        )},
        "/admin": {"get": _operation(
            "adminDashboard", "The operator's live dashboard (HTML)", "admin", "public",
            {"200": _text("text/html", "The page; the admin token is entered in it (kept in "
                          "session storage, sent as a bearer header, never in a URL or cookie).")},
        )},
    }


def _room_paths() -> JSONObject:
    """Contract v1.1: the waiting room (flashsale/room/): join, the ticket, the admin's
    figures and controls, the waiting page."""
    sale_id = _ref("parameters", "SaleId")
    ticket_id = _path_param("ticket_id", "Ticket identifier.")
    room_off = _error_response("The sale has no waiting room.", ["waiting_room_off"])
    return {
        "/api/v1/sales/{sale_id}/queue": {"post": _operation(
            "joinQueue", "Take a ticket in the sale's waiting room", "waiting room", "buyer",
            {"201": _response("A new ticket.", _schema("Ticket")),
             "200": _response("The buyer's existing ticket.", _schema("Ticket")),
             "404": _sale_not_found(),
             "409": _error_response(
                 "No room on this sale, nothing can be had, or the sale ended.",
                 ["waiting_room_off", "sold_out", "sale_not_active"]),
             "503": _unavailable(("overloaded",))},
            description="No body. One ticket per buyer and sale; `overloaded` when the room "
            "holds as many tickets as it may.",
            parameters=[sale_id],
        )},
        "/api/v1/sales/{sale_id}/queue/{ticket_id}": {"get": _operation(
            "getTicket", "Read (and keep alive) my ticket", "waiting room", "buyer",
            {"200": _response("The ticket.", _schema("Ticket")),
             "404": _error_response("No such ticket of this buyer, or no such sale.",
                                    ["ticket_not_found", "sale_not_found"])},
            description="Polling is the heartbeat: poll again after `poll_after_ms`.",
            parameters=[sale_id, ticket_id],
        )},
        "/api/v1/admin/sales/{sale_id}/waiting-room": {
            "get": _operation(
                "getWaitingRoom", "The waiting room's figures", "admin", "admin",
                {"200": _response("The figures.", _schema("WaitingRoomFigures")),
                 "404": _sale_not_found(), "409": room_off},
                parameters=[sale_id],
            ),
            "patch": _operation(
                "patchWaitingRoom", "Pause, resume, change the rate", "admin", "admin",
                {"200": _response("The figures.", _schema("WaitingRoomFigures")),
                 "400": _bad_request("malformed JSON, wrong types, out of bounds, unknown "
                                     "fields"),
                 "404": _sale_not_found(), "409": room_off},
                parameters=[sale_id],
                request_body=_request_body("WaitingRoomPatch", "The fields to change.",
                                           {"paused": True}),
            ),
        },
        "/sales/{sale_id}/wait": {"get": _operation(
            "waitingPage", "The waiting page (HTML)", "waiting room", "public",
            {"200": _text("text/html", "The page: it takes the buyer's token, joins, shows "
                          "position and ETA, and reserves with the pass once admitted."),
             "404": _error_response("Not a sale id.", ["sale_not_found"])},
            description="The page itself does not look the sale up (it joins, and shows the "
            "answer): only a `sale_id` that cannot be one is 404.",
            parameters=[sale_id],
        )},
    }


def build_openapi() -> dict[str, Any]:
    """Return the OpenAPI 3.1.0 document of every endpoint of the contract."""
    return {
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
            "(the request's own when it sends 1-128 characters of `[A-Za-z0-9._-]`). Integers "
            "in request bodies are JSON integer literals (`2`, not `2.0`).",
        },
        "tags": [
            {"name": "sales", "description": "Sales (admin writes, public reads)."},
            {"name": "orders", "description": "Buyer orders."},
            {"name": "admin", "description": "Operator views."},
            {"name": "payments", "description": "Payment gateway callbacks."},
            {"name": "operations", "description": "Health, readiness, metrics, this document."},
            {"name": "waiting room", "description": "(v1.1) A sale's waiting room."},
        ],
        "paths": {
            **_sale_paths(),
            **_order_paths(),
            **_payment_paths(),
            **_operations_paths(),
            **_operator_paths(),
            **_room_paths(),
        },
        "components": _components(),
    }
