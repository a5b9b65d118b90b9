"""The OpenAPI document served at /openapi.json describes the whole v1 contract."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from openapi_schema_validator import OAS31Validator, oas31_format_checker
from openapi_schema_validator import validate as validate_instance
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from flashsale.web.openapi import build_openapi

JSONObject = dict[str, Any]

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

# (method, path, operationId, security scheme or None for public) — api-contract.md.
CONTRACT: list[tuple[str, str, str, str | None]] = [
    ("post", "/api/v1/sales", "createSale", "adminToken"),
    ("get", "/api/v1/sales/{sale_id}", "getSale", None),
    ("post", "/api/v1/sales/{sale_id}/restock", "restockSale", "adminToken"),
    ("get", "/api/v1/admin/sales/{sale_id}/ledger", "getLedger", "adminToken"),
    ("post", "/api/v1/sales/{sale_id}/orders", "createOrder", "buyerJWT"),
    ("get", "/api/v1/orders/{order_id}", "getOrder", "buyerJWT"),
    ("post", "/api/v1/orders/{order_id}/cancel", "cancelOrder", "buyerJWT"),
    ("post", "/api/v1/orders/{order_id}/pay", "payOrder", "buyerJWT"),
    ("post", "/api/v1/payments/webhook", "paymentWebhook", None),
    ("post", "/api/v1/admin/gateway/payments/{payment_id}/settle", "settlePayment", "adminToken"),
    ("get", "/healthz", "healthz", None),
    ("get", "/readyz", "readyz", None),
    ("get", "/metrics", "metrics", None),
    ("get", "/openapi.json", "openapi", None),
    # v1.1: the operator's view
    ("post", "/api/v1/sales/{sale_id}/end", "endSale", "adminToken"),
    ("get", "/api/v1/admin/events", "streamAdminEvents", "adminToken"),
    ("get", "/admin", "adminDashboard", None),
    # v1.1: the waiting room
    ("post", "/api/v1/sales/{sale_id}/queue", "joinQueue", "buyerJWT"),
    ("get", "/api/v1/sales/{sale_id}/queue/{ticket_id}", "getTicket", "buyerJWT"),
    ("get", "/api/v1/admin/sales/{sale_id}/waiting-room", "getWaitingRoom", "adminToken"),
    ("patch", "/api/v1/admin/sales/{sale_id}/waiting-room", "patchWaitingRoom", "adminToken"),
    ("get", "/sales/{sale_id}/wait", "waitingPage", None),
]

# Status codes each operation must document (the contract's, plus 401 and 503).
EXPECTED_STATUSES: dict[str, set[str]] = {
    "createSale": {"201", "400", "401"},
    "getSale": {"200", "404"},
    "restockSale": {"200", "400", "401", "404"},
    "getLedger": {"200", "401", "404"},
    "createOrder": {"202", "400", "401", "404", "409", "422", "429", "503"},
    "getOrder": {"200", "401", "404", "429"},
    "cancelOrder": {"200", "401", "404", "409", "429"},
    "payOrder": {"201", "400", "401", "404", "409", "429", "503"},
    "paymentWebhook": {"200", "400", "503"},
    "settlePayment": {"200", "400", "401", "404"},
    "healthz": {"200"},
    "readyz": {"200", "503"},
    "metrics": {"200"},
    "openapi": {"200"},
    "endSale": {"200", "401", "404"},
    "streamAdminEvents": {"200", "401", "503"},
    "adminDashboard": {"200"},
    "joinQueue": {"201", "401", "404", "409", "503"},
    "getTicket": {"200", "401", "404"},
    "getWaitingRoom": {"200", "401", "404", "409"},
    "patchWaitingRoom": {"200", "400", "401", "404", "409"},
    "waitingPage": {"200"},
}

# Answers the front can give to any request (web/front.py: the head and body timeouts,
# the connection cap), and every buyer request (web/admission.py: the rate limits).
FRONT_STATUSES = {"408": {"request_timeout"}, "503": {"unavailable"}}
BUYER_OPERATIONS = ("createOrder", "getOrder", "cancelOrder", "payOrder")

# Error codes the contract names, per (operationId, status).
EXPECTED_ERROR_CODES: dict[tuple[str, str], set[str]] = {
    ("createOrder", "409"): {"sold_out", "limit_exceeded", "sale_not_active"},
    ("createOrder", "404"): {"sale_not_found"},
    ("createOrder", "400"): {"invalid_request"},
    ("createOrder", "422"): {"idempotency_key_reused"},
    ("createOrder", "401"): {"unauthorized"},
    ("createOrder", "403"): {"pass_required"},
    ("joinQueue", "409"): {"waiting_room_off", "sold_out", "sale_not_active"},
    ("createOrder", "429"): {"rate_limited"},
    ("createOrder", "503"): {"overloaded", "unavailable"},
    ("createSale", "400"): {"invalid_request"},
    ("getSale", "404"): {"sale_not_found"},
    ("restockSale", "404"): {"sale_not_found"},
    ("getLedger", "404"): {"sale_not_found"},
    ("getOrder", "404"): {"order_not_found"},
    ("cancelOrder", "404"): {"order_not_found"},
    ("cancelOrder", "409"): {"order_not_cancellable"},
    ("payOrder", "404"): {"order_not_found"},
    ("payOrder", "409"): {"order_not_payable"},
    ("payOrder", "400"): {"invalid_request"},
    ("paymentWebhook", "400"): {"invalid_signature", "invalid_request"},
    ("settlePayment", "404"): {"payment_not_found"},
}

for _operation_id in BUYER_OPERATIONS:
    EXPECTED_ERROR_CODES[(_operation_id, "429")] = {"rate_limited"}

# Non-2xx responses whose body is not the error envelope, by contract.
NON_ENVELOPE_ERRORS = {("readyz", "503")}


@pytest.fixture(scope="module")
def doc() -> JSONObject:
    return build_openapi()


def _operations(doc: JSONObject) -> Iterator[tuple[str, str, JSONObject]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method, path, operation


def _by_id(doc: JSONObject) -> dict[str, JSONObject]:
    return {op["operationId"]: op for _, _, op in _operations(doc)}


def _resolve(doc: JSONObject, node: JSONObject) -> JSONObject:
    while "$ref" in node:
        pointer = node["$ref"]
        assert pointer.startswith("#/"), pointer
        target: Any = doc
        for part in pointer[2:].split("/"):
            target = target[part]
        node = target
    return node


def _schemas_within(doc: JSONObject, schema: JSONObject, seen: set[int]) -> Iterator[JSONObject]:
    """Every schema object reachable from ``schema``, following $refs."""
    schema = _resolve(doc, schema)
    if id(schema) in seen:
        return
    seen.add(id(schema))
    yield schema
    children: list[Any] = list(schema.get("properties", {}).values())
    for key in ("items", "additionalProperties", "not", "if", "then", "else", "contains"):
        if isinstance(schema.get(key), dict):
            children.append(schema[key])
    for key in ("allOf", "anyOf", "oneOf", "prefixItems"):
        children.extend(schema.get(key, []))
    for child in children:
        yield from _schemas_within(doc, child, seen)


def _schema_of(doc: JSONObject, response: JSONObject) -> JSONObject:
    response = _resolve(doc, response)
    schema: JSONObject = response["content"]["application/json"]["schema"]
    return schema


def _with_components(doc: JSONObject, schema: JSONObject) -> JSONObject:
    """``schema`` made standalone: its ``#/components/...`` refs resolve inside it."""
    return {**schema, "components": doc["components"]}


def _check(doc: JSONObject, schema_name: str, instance: Any) -> None:
    schema = _with_components(doc, {"$ref": f"#/components/schemas/{schema_name}"})
    validate_instance(instance, schema, cls=OAS31Validator, format_checker=oas31_format_checker)


def _rejects(doc: JSONObject, schema_name: str, instance: Any) -> bool:
    schema = _with_components(doc, {"$ref": f"#/components/schemas/{schema_name}"})
    OAS31Validator.check_schema(schema)
    validator = OAS31Validator(schema, format_checker=oas31_format_checker)
    return not validator.is_valid(instance)


# --------------------------------------------------------------------------- document validity


def test_document_is_valid_openapi_3_1(doc: JSONObject) -> None:
    assert doc["openapi"] == "3.1.0"
    validate(doc)
    validate(doc, cls=OpenAPIV31SpecValidator)


def test_document_is_plain_json_and_fresh_per_call(doc: JSONObject) -> None:
    assert json.loads(json.dumps(doc)) == doc
    other = build_openapi()
    assert other == doc
    mutated = build_openapi()
    mutated["paths"]["/healthz"]["get"]["responses"].clear()
    mutated["components"]["schemas"]["Error"]["required"].append("x")
    assert build_openapi() == doc


def test_all_refs_resolve(doc: JSONObject) -> None:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    refs = list(walk(doc))
    assert refs
    for ref in refs:
        _resolve(doc, {"$ref": ref})


# --------------------------------------------------------------------------- contract coverage


def test_every_contract_operation_is_present_with_its_operation_id(doc: JSONObject) -> None:
    found = {(method, path): op["operationId"] for method, path, op in _operations(doc)}
    expected = {(method, path): operation_id for method, path, operation_id, _ in CONTRACT}
    assert found == expected


def test_operation_ids_are_unique(doc: JSONObject) -> None:
    ids = [op["operationId"] for _, _, op in _operations(doc)]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(("method", "path", "operation_id", "scheme"), CONTRACT)
def test_security_per_operation(
    doc: JSONObject, method: str, path: str, operation_id: str, scheme: str | None
) -> None:
    operation = doc["paths"][path][method]
    if scheme is None:
        assert operation["security"] == [], operation_id
        assert "401" not in operation["responses"], operation_id
    else:
        assert operation["security"] == [{scheme: []}], operation_id
        assert "401" in operation["responses"], operation_id
        codes = _error_codes(doc, operation["responses"]["401"])
        assert codes == {"unauthorized"}, operation_id


def test_every_authenticated_operation_declares_401_and_security(doc: JSONObject) -> None:
    schemes = doc["components"]["securitySchemes"]
    for _, _, operation in _operations(doc):
        security = operation.get("security", doc.get("security", []))
        if security:
            assert "401" in operation["responses"], operation["operationId"]
            for requirement in security:
                assert set(requirement) <= set(schemes)


def test_security_schemes(doc: JSONObject) -> None:
    schemes = doc["components"]["securitySchemes"]
    assert schemes["buyerJWT"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": schemes["buyerJWT"]["description"],
    }
    assert schemes["adminToken"]["type"] == "http"
    assert schemes["adminToken"]["scheme"] == "bearer"
    assert "security" not in doc  # applied per operation only


@pytest.mark.parametrize("operation_id", sorted(EXPECTED_STATUSES))
def test_front_answers_documented_everywhere(doc: JSONObject, operation_id: str) -> None:
    """408 request_timeout and the connection cap's 503 unavailable can answer any request."""
    responses = _by_id(doc)[operation_id]["responses"]
    for status, codes in FRONT_STATUSES.items():
        assert status in responses, (operation_id, status)
        response = responses[status]
        if (operation_id, status) in NON_ENVELOPE_ERRORS:  # readyz 503: Readiness or Error
            schemas = _schema_of(doc, response)["anyOf"]
            assert doc["components"]["schemas"]["Error"] in [_resolve(doc, s) for s in schemas]
            continue
        found = _error_codes(doc, response)
        assert found is not None and codes <= found, (operation_id, status, found)


@pytest.mark.parametrize(("operation_id", "statuses"), sorted(EXPECTED_STATUSES.items()))
def test_documented_statuses(doc: JSONObject, operation_id: str, statuses: set[str]) -> None:
    responses = _by_id(doc)[operation_id]["responses"]
    assert statuses <= set(responses)
    successes = {s for s in responses if s.startswith("2")}
    # joinQueue: 201 a new ticket, 200 the buyer's existing one (contract v1.1)
    assert len(successes) == (2 if operation_id == "joinQueue" else 1), successes


# --------------------------------------------------------------------------- errors


def _error_codes(doc: JSONObject, response: JSONObject) -> set[str] | None:
    """Codes a response narrows the envelope to, or None when any code is allowed."""
    schema = _resolve(doc, _schema_of(doc, response))
    for part in schema.get("allOf", []):
        code = part.get("properties", {}).get("error", {}).get("properties", {}).get("code")
        if code is not None:
            return set(code["enum"])
    return None


def _is_error_envelope(doc: JSONObject, schema: JSONObject) -> bool:
    error = doc["components"]["schemas"]["Error"]
    if _resolve(doc, schema) is error:
        return True
    return any(_resolve(doc, part) is error for part in schema.get("allOf", []))


def test_error_schema_shape(doc: JSONObject) -> None:
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert error["additionalProperties"] is False
    inner = _resolve(doc, error["properties"]["error"])  # a component of its own (ErrorDetail)
    assert inner["type"] == "object"
    assert sorted(inner["required"]) == ["code", "message"]
    assert inner["additionalProperties"] is False
    assert inner["properties"]["code"]["type"] == "string"
    assert inner["properties"]["message"]["type"] == "string"
    _check(doc, "Error", {"error": {"code": "sold_out", "message": "Sold out."}})
    assert _rejects(doc, "Error", {"error": {"code": "sold_out"}})
    assert _rejects(doc, "Error", {"error": {"code": "x", "message": "m"}, "extra": 1})


def test_every_non_2xx_response_uses_the_error_envelope(doc: JSONObject) -> None:
    for _, _, operation in _operations(doc):
        for status, response in operation["responses"].items():
            if status.startswith("2") or (operation["operationId"], status) in NON_ENVELOPE_ERRORS:
                continue
            schema = _schema_of(doc, response)
            assert _is_error_envelope(doc, schema), (operation["operationId"], status)


def test_retry_after_on_every_429_and_503(doc: JSONObject) -> None:
    seen = 0
    for _, _, operation in _operations(doc):
        for status in ("429", "503"):
            key = (operation["operationId"], status)
            if status not in operation["responses"] or key in NON_ENVELOPE_ERRORS:
                continue
            headers = _resolve(doc, operation["responses"][status])["headers"]
            header = _resolve(doc, headers["Retry-After"])
            assert header["required"] is True, key
            assert header["schema"]["type"] == "integer", key
            seen += 1
    assert seen >= 2


@pytest.mark.parametrize(("key", "codes"), sorted(EXPECTED_ERROR_CODES.items()))
def test_contract_error_codes(doc: JSONObject, key: tuple[str, str], codes: set[str]) -> None:
    operation_id, status = key
    response = _by_id(doc)[operation_id]["responses"][status]
    assert _error_codes(doc, response) == codes


def test_narrowed_error_response_rejects_other_codes(doc: JSONObject) -> None:
    schema = _schema_of(doc, _by_id(doc)["createOrder"]["responses"]["409"])
    validator = OAS31Validator(_with_components(doc, schema))
    for code in ("sold_out", "limit_exceeded", "sale_not_active"):
        assert validator.is_valid({"error": {"code": code, "message": "m"}}), code
    assert not validator.is_valid({"error": {"code": "nope", "message": "m"}})
    assert not validator.is_valid({"error": {"code": "sold_out", "message": "m"}, "x": 1})


# --------------------------------------------------------------------------- request bodies


def test_request_body_schemas_are_closed(doc: JSONObject) -> None:
    bodies = 0
    for _, _, operation in _operations(doc):
        body = operation.get("requestBody")
        if body is None:
            continue
        bodies += 1
        for media in _resolve(doc, body)["content"].values():
            for schema in _schemas_within(doc, media["schema"], set()):
                if "properties" in schema:
                    assert schema.get("additionalProperties") is False, operation["operationId"]
                    assert set(schema.get("required", [])) <= set(schema["properties"])
    # createSale, restockSale, createOrder, paymentWebhook, settlePayment, patchWaitingRoom
    assert bodies == 6


def test_sale_create_bounds(doc: JSONObject) -> None:
    props = doc["components"]["schemas"]["SaleCreate"]["properties"]
    assert props["sku"]["minLength"] == 1 and props["sku"]["maxLength"] == 64
    assert props["name"]["minLength"] == 1 and props["name"]["maxLength"] == 200
    assert props["price_cents"]["type"] == "integer" and props["price_cents"]["minimum"] == 0
    assert props["stock"]["type"] == "integer" and props["stock"]["minimum"] == 0
    assert props["per_user_limit"]["minimum"] == 1 and props["per_user_limit"]["default"] == 1
    assert props["hold_seconds"]["minimum"] == 1 and props["hold_seconds"]["default"] == 600
    assert props["starts_at"] == {**props["starts_at"], "type": "string", "format": "date-time"}
    assert props["ends_at"]["type"] == ["string", "null"]
    assert props["ends_at"]["format"] == "date-time"
    minimal = {"sku": "S", "name": "N", "price_cents": 0, "stock": 0}
    _check(doc, "SaleCreate", minimal)
    _check(doc, "SaleCreate", {**minimal, "ends_at": None, "starts_at": "2030-01-01T00:00:00Z"})
    _check(doc, "SaleCreate", {**minimal, "sku": "x" * 64, "name": "Größe 42 — ☂ " * 10})
    for bad in (
        {**minimal, "unknown": 1},
        {**minimal, "price_cents": -1},
        {**minimal, "stock": 1.5},
        {**minimal, "per_user_limit": 0},
        {**minimal, "hold_seconds": 0},
        {**minimal, "sku": ""},
        {**minimal, "sku": "x" * 65},
        {**minimal, "name": "x" * 201},
        {**minimal, "name": "line\nbreak"},
        {**minimal, "sku": "tab\t"},
        {**minimal, "sku": "del\x7f"},
        {"sku": "S", "name": "N", "price_cents": 0},
    ):
        assert _rejects(doc, "SaleCreate", bad), bad


def test_quantity_bodies(doc: JSONObject) -> None:
    _check(doc, "OrderCreate", {})
    _check(doc, "OrderCreate", {"quantity": 3})
    _check(doc, "Restock", {"quantity": 1})
    assert _rejects(doc, "Restock", {})
    for name in ("OrderCreate", "Restock"):
        assert _rejects(doc, name, {"quantity": 0}), name
        assert _rejects(doc, name, {"quantity": "1"}), name
        assert _rejects(doc, name, {"quantity": 1, "extra": True}), name
        assert _rejects(doc, name, []), name
    for operation_id in (
        "createSale", "restockSale", "createOrder", "paymentWebhook", "settlePayment"
    ):
        body = _by_id(doc)[operation_id]["requestBody"]
        assert body["required"] is True
        assert "16 KiB" in body["description"]


def test_webhook_event_and_signature(doc: JSONObject) -> None:
    event = {
        "event_id": "evt_1",
        "type": "payment.succeeded",
        "payment_id": "pay_1",
        "order_id": "ord_1",
        "amount_cents": 100,
    }
    _check(doc, "WebhookEvent", event)
    assert _rejects(doc, "WebhookEvent", {**event, "type": "payment.refunded"})
    operation = _by_id(doc)["paymentWebhook"]
    (param,) = (_resolve(doc, p) for p in operation["parameters"])
    assert param["name"] == "Flashsale-Signature" and param["in"] == "header"
    pattern = re.compile(param["schema"]["pattern"])
    assert pattern.search("t=1700000000,v1=" + "ab" * 32)
    assert not pattern.search("v1=" + "ab" * 32)


# --------------------------------------------------------------------------- parameters


def test_path_parameters(doc: JSONObject) -> None:
    for method, path, operation in _operations(doc):
        declared = {
            p["name"]: p
            for p in (_resolve(doc, ref) for ref in operation.get("parameters", []))
            if p["in"] == "path"
        }
        assert set(declared) == set(re.findall(r"{(\w+)}", path)), (method, path)
        for param in declared.values():
            assert param["required"] is True
            assert param["schema"]["type"] == "string"
            assert param["schema"]["pattern"] == "^[A-Za-z0-9_.-]{1,80}$"


def test_idempotency_key_header(doc: JSONObject) -> None:
    params = [_resolve(doc, p) for p in _by_id(doc)["createOrder"]["parameters"]]
    (key,) = (p for p in params if p["name"] == "Idempotency-Key")
    assert key["in"] == "header" and key["required"] is False
    pattern = re.compile(key["schema"]["pattern"])
    assert pattern.search("a")
    assert pattern.search("~" * 128)
    assert pattern.search("key-0f8c!#$%&'()*+,-./:;<=>?@[]^_`{|}")
    assert pattern.search("inner space ok")
    for bad in ("", "x" * 129, " lead", "trail ", "tab\t", "é", "\x7f"):
        assert not pattern.search(bad), bad


# --------------------------------------------------------------------------- response schemas


EXACT_FIELDS: dict[str, set[str]] = {
    "Sale": {
        "sale_id",
        "sku",
        "name",
        "price_cents",
        "stock",
        "available",
        "per_user_limit",
        "starts_at",
        "ends_at",
        "hold_seconds",
        "status",
        "waiting_room",  # v1.1
    },
    "Ticket": {
        "ticket_id", "sale_id", "state", "position", "eta_seconds", "poll_after_ms", "pass",
        "pass_expires_at",
    },
    "WaitingRoomFigures": {
        "waiting", "admitted_outstanding", "admitted_total", "used", "expired", "admit_per_s",
        "measured_admit_per_s", "paused",
    },
    "OrderAccepted": {
        "order_id",
        "sale_id",
        "user_id",
        "quantity",
        "amount_cents",
        "status",
        "expires_at",
    },
    "Order": {
        "order_id",
        "sale_id",
        "user_id",
        "quantity",
        "amount_cents",
        "status",
        "expires_at",
        "payment_id",
        "shipment_id",
        "tracking_number",
    },
    "Payment": {"payment_id", "order_id", "amount_cents", "status"},
    "Ledger": {
        "stock",
        "available",
        "pending",
        "awaiting_payment",
        "paid",
        "shipped",
        "cancelled",
        "expired",
        "failed",
        "consistent",
        "sold",
        "in_redis",
    },
}


@pytest.mark.parametrize(("name", "fields"), sorted(EXACT_FIELDS.items()))
def test_response_schema_fields(doc: JSONObject, name: str, fields: set[str]) -> None:
    schema = doc["components"]["schemas"][name]
    assert set(schema["properties"]) == fields
    assert set(schema["required"]) == fields
    assert schema["additionalProperties"] is False


def test_status_enums_and_nullables(doc: JSONObject) -> None:
    schemas = doc["components"]["schemas"]
    assert schemas["Sale"]["properties"]["status"]["enum"] == [
        "scheduled",
        "active",
        "sold_out",
        "ended",
    ]
    assert schemas["Order"]["properties"]["status"]["enum"] == [
        "pending",
        "awaiting_payment",
        "paid",
        "shipped",
        "cancelled",
        "expired",
        "failed",
    ]
    assert schemas["OrderAccepted"]["properties"]["status"]["enum"] == ["pending"]
    assert schemas["Payment"]["properties"]["status"]["enum"] == ["requires_payment"]
    for field in ("payment_id", "shipment_id", "tracking_number"):
        assert schemas["Order"]["properties"][field]["type"] == ["string", "null"]
    assert schemas["Sale"]["properties"]["ends_at"]["type"] == ["string", "null"]
    assert schemas["Ledger"]["properties"]["consistent"]["type"] == "boolean"


def test_sample_responses_validate(doc: JSONObject) -> None:
    sale = {
        "sale_id": "s_1",
        "sku": "SKU-1",
        "name": "Sneaker",
        "price_cents": 12900,
        "stock": 100,
        "available": 97,
        "per_user_limit": 2,
        "starts_at": "2030-01-01T00:00:00Z",
        "ends_at": None,
        "hold_seconds": 600,
        "status": "active",
        "waiting_room": None,
    }
    _check(doc, "Sale", sale)
    _check(doc, "Sale", {**sale, "waiting_room": {"admit_per_s": 50, "pass_seconds": 300,
                                                  "oversubscribe": 2}})
    ticket = {"ticket_id": "tk_0123456789abcdef0123", "sale_id": "s_1", "state": "waiting",
              "position": 12, "eta_seconds": {"low": 1, "high": 3}, "poll_after_ms": 1120,
              "pass": None, "pass_expires_at": None}
    _check(doc, "Ticket", ticket)
    _check(doc, "Ticket", {**ticket, "state": "admitted", "position": None,
                           "eta_seconds": None, "pass": "abc.def",
                           "pass_expires_at": "2030-01-01T00:05:00.000Z"})
    accepted = {
        "order_id": "o_1",
        "sale_id": "s_1",
        "user_id": "alice",
        "quantity": 1,
        "amount_cents": 12900,
        "status": "pending",
        "expires_at": "2030-01-01T00:10:00Z",
    }
    _check(doc, "OrderAccepted", accepted)
    order = {**accepted, "payment_id": None, "shipment_id": None, "tracking_number": None}
    _check(doc, "Order", order)
    _check(doc, "Order", {**order, "status": "shipped", "shipment_id": "sh", "payment_id": "p"})
    assert _rejects(doc, "Order", {**order, "status": "refunded"})
    assert _rejects(doc, "Order", accepted)
    assert _rejects(doc, "OrderAccepted", {**accepted, "status": "paid"})
    _check(
        doc,
        "Payment",
        {"payment_id": "p", "order_id": "o_1", "amount_cents": 1, "status": "requires_payment"},
    )
    ledger: JSONObject = dict.fromkeys(EXACT_FIELDS["Ledger"] - {"consistent", "in_redis"}, 0)
    _check(doc, "Ledger", {**ledger, "available": -1, "consistent": False, "in_redis": True})
    _check(doc, "Health", {"status": "ok"})
    _check(doc, "Readiness", {"status": "unavailable", "checks": {"redis": "down"}})


def test_operations_endpoints(doc: JSONObject) -> None:
    ops = _by_id(doc)
    metrics = ops["metrics"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}
    assert _schema_of(doc, ops["healthz"]["responses"]["200"]) == {
        "$ref": "#/components/schemas/Health"
    }
    ready_503 = _schema_of(doc, ops["readyz"]["responses"]["503"])
    # not ready (Readiness), or the front's connection cap (the error envelope)
    assert [_resolve(doc, s) for s in ready_503["anyOf"]] == [
        doc["components"]["schemas"]["Readiness"], doc["components"]["schemas"]["Error"]
    ]


# --------------------------------------------------------------------------- links


@pytest.mark.parametrize(
    ("source", "status", "param", "targets"),
    [
        ("createSale", "201", "sale_id", {"getSale", "restockSale", "createOrder"}),
        ("createOrder", "202", "order_id", {"getOrder", "cancelOrder", "payOrder"}),
    ],
)
def test_links(doc: JSONObject, source: str, status: str, param: str, targets: set[str]) -> None:
    ops = _by_id(doc)
    links = ops[source]["responses"][status]["links"]
    linked = {link["operationId"] for link in links.values()}
    assert targets <= linked
    body_schema = _resolve(doc, _schema_of(doc, ops[source]["responses"][status]))
    for link in links.values():
        assert link["parameters"] == {param: f"$response.body#/{param}"}
        assert param in body_schema["properties"]
        target_params = {
            _resolve(doc, p)["name"] for p in ops[link["operationId"]].get("parameters", [])
        }
        assert param in target_params, link["operationId"]


def test_every_link_targets_an_existing_operation(doc: JSONObject) -> None:
    ops = _by_id(doc)
    for _, _, operation in _operations(doc):
        for response in operation["responses"].values():
            for link in response.get("links", {}).values():
                assert link["operationId"] in ops


def test_build_is_deterministic() -> None:
    first = build_openapi()
    second = copy.deepcopy(first)
    assert json.dumps(build_openapi(), sort_keys=False) == json.dumps(second, sort_keys=False)


def test_gateway_settle_and_webhook_ack(doc: JSONObject) -> None:
    _check(doc, "GatewaySettle", {"outcome": "succeeded"})
    _check(doc, "GatewaySettle", {"outcome": "failed"})
    for bad in ({}, {"outcome": "refunded"}, {"outcome": "succeeded", "amount_cents": 1}):
        assert _rejects(doc, "GatewaySettle", bad), bad
    _check(doc, "WebhookAck", {"status": "ok", "event_id": "evt_1", "outcome": "paid"})
    assert _rejects(doc, "WebhookAck", {"status": "ok", "event_id": "e", "outcome": "shipped"})
    _check(
        doc,
        "Settlement",
        {"payment_id": "pay_1", "event_id": "evt_1", "type": "payment.succeeded",
         "webhook_status": 200, "webhook_response": {"status": "ok"}, "attempts": 1},
    )
    operation = _by_id(doc)["settlePayment"]
    assert operation["tags"] == ["admin"]
    assert operation["security"] == [{"adminToken": []}]
