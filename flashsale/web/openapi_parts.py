"""The parts of the OpenAPI document (flashsale/web/openapi.py assembles the paths).

The document mirrors ``api-contract.md``. Its schemas are generated from the
shapes the server decodes and answers with (flashsale/schemas: msgspec
Structs, through ``msgspec.json.schema_components``) and its bounds come from
flashsale/schemas/bounds.py, so the document and the server cannot disagree
on a field, a bound or a status name. This module only assembles paths:
every operation shares the error envelope, the security schemes and the
answers any request can get from the front (401 on authenticated ones, 429
on buyer ones, 408 and the connection cap's 503 on all).

Adding an endpoint: declare its bodies in flashsale/schemas (listed in
``REQUEST_BODIES``/``RESPONSE_BODIES``), then add its path with
:func:`_operation` in a ``_..._paths()`` function joined in :func:`build_openapi`.
Every call to :func:`build_openapi` returns a fresh, independent, JSON-serialisable dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import msgspec

from flashsale.schemas import bounds
from flashsale.schemas.bodies import REQUEST_BODIES
from flashsale.schemas.fields import ENUM_ORDER
from flashsale.schemas.responses import RESPONSE_BODIES

JSONObject = dict[str, Any]
Auth = Literal["admin", "buyer", "public"]

OPENAPI_VERSION: Final = "3.1.0"
API_VERSION: Final = "1.1.0"
MAX_STOCK: Final = bounds.MAX_STOCK
BUYER_SCHEME: Final = "buyerJWT"
ADMIN_SCHEME: Final = "adminToken"
JSON_MEDIA: Final = "application/json"
SCHEMA_REF: Final = "#/components/schemas/{name}"
BODY_LIMIT_NOTE: Final = (
    f"The raw body may be at most {bounds.MAX_BODY_BYTES // 1024} KiB "
    f"({bounds.MAX_BODY_BYTES} bytes); larger bodies get 400 `invalid_request`. Integers are "
    "JSON Schema's `integer`: a number with a zero fraction (`2.0`, `2e0`) is that integer, "
    "`2.5` is not."
)
# keywords that constrain one JSON type only: {X, type: T} | null == {X, type: [T, null]}
_TYPE_BOUND_KEYWORDS: Final = frozenset({
    "type", "format", "minLength", "maxLength", "pattern", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "description", "title",
})

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


def _string(min_length: int = 1, max_length: int | None = None, **extra: Any) -> JSONObject:
    schema: JSONObject = {"type": "string", "minLength": min_length}
    if max_length is not None:
        schema["maxLength"] = max_length
    schema.update(extra)
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
    return _response(description, schema, headers=_retry_after() if retry_after else None)


def _retry_after() -> JSONObject:
    return {"Retry-After": _ref("headers", "RetryAfter")}


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

CONNECTION_CAP_NOTE: Final = (
    "Also the front's connection cap: when every connection of the process is busy in a "
    "request, a new one is answered `unavailable` before anything is read, and closed."
)


def _bad_request(what: str) -> JSONObject:
    return _error_response(f"Invalid request: {what}.", ["invalid_request"])


def _unauthorized() -> JSONObject:
    return _error_response(
        "Missing, invalid or expired credentials for this endpoint.", ["unauthorized"]
    )


def _rate_limited() -> JSONObject:
    return _error_response(
        "Too many requests from this buyer (or for the whole process); retry after "
        "`Retry-After`. Nothing was done.", ["rate_limited"], retry_after=True,
    )


def _request_timeout() -> JSONObject:
    return _error_response(
        "The request head, or the body the operation reads, was not received within the "
        "front's timeouts; the connection is closed.", ["request_timeout"],
    )


def _sale_not_found() -> JSONObject:
    return _error_response("No sale with this id.", ["sale_not_found"])


def _order_not_found() -> JSONObject:
    return _error_response(
        "No order with this id visible to this buyer (another buyer's order looks the same).",
        ["order_not_found"],
    )


def _unavailable(codes: Sequence[str] = ()) -> JSONObject:
    """503 with Retry-After: the operation's ``codes``, plus ``unavailable`` (the connection
    cap, and any backend that does not answer)."""
    return _error_response(
        "A backing store is unavailable or the service is shedding load; nothing changed. "
        f"Retry after the `Retry-After` delay. {CONNECTION_CAP_NOTE}",
        [*codes, *(() if "unavailable" in codes else ("unavailable",))],
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
    """One operation, with the answers any request to it can get added: 401 (authenticated),
    429 (buyer: the rate limits), 408 (timeouts) and 503 (the connection cap)."""
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
    if auth == "buyer":
        all_responses.setdefault("429", _rate_limited())
    all_responses.setdefault("408", _request_timeout())
    all_responses.setdefault("503", _unavailable())
    operation["responses"] = dict(sorted(all_responses.items()))
    return operation


# --------------------------------------------------------------------------- components


def _tidy(node: Any) -> Any:
    """msgspec's schema as this document writes it: enums in their declared order
    (fields.choice), and ``anyOf [{type: T, ...}, {type: null}]`` as ``type: [T, "null"]``."""
    if isinstance(node, list):
        return [_tidy(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _tidy(v) for k, v in node.items()}
    if ENUM_ORDER in out:
        out["enum"] = out.pop(ENUM_ORDER)
    options = out.get("anyOf")
    if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
        (other,) = (o for o in options if o != {"type": "null"})
        if isinstance(other.get("type"), str) and set(other) <= _TYPE_BOUND_KEYWORDS:
            del out["anyOf"]
            out = {**other, **out, "type": [other["type"], "null"]}
    return out


def _schemas() -> JSONObject:
    _, components = msgspec.json.schema_components(
        (*REQUEST_BODIES, *RESPONSE_BODIES), ref_template=SCHEMA_REF
    )
    schemas: JSONObject = _tidy(components)
    return schemas


def _path_param(name: str, description: str) -> JSONObject:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": _string(max_length=bounds.PATH_ID_MAX_CHARS, pattern=bounds.PATH_ID_PATTERN),
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
            "description": f"1–{bounds.IDEMPOTENCY_KEY_MAX_CHARS} printable ASCII characters "
            "(0x20–0x7E), no leading or trailing space (HTTP trims those); optional, strongly "
            "recommended. A retry with the same buyer, key and body returns the first decided "
            "response (202, 409, 422) again and reserves nothing more.",
            "schema": _string(
                max_length=bounds.IDEMPOTENCY_KEY_MAX_CHARS,
                pattern=bounds.IDEMPOTENCY_KEY_PATTERN,
            ),
        },
        "FlashsalePass": {
            "name": "Flashsale-Pass",
            "in": "header",
            "required": False,
            "description": "(v1.1) The pass of an admitted waiting-room ticket (its `pass`); "
            "required on a sale with a waiting room.",
            "schema": _string(max_length=bounds.ROOM_PASS_MAX_CHARS),
        },
        "FlashsaleSignature": {
            "name": "Flashsale-Signature",
            "in": "header",
            "required": True,
            "description": "`t=<unix seconds>,v1=<hex HMAC-SHA256(FLASHSALE_WEBHOOK_SECRET, "
            '"<t>.<raw body>")>`; `t` must be within 300 s of now.',
            "schema": _string(pattern=bounds.SIGNATURE_PATTERN),
        },
    }


def _security_schemes() -> JSONObject:
    return {
        BUYER_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "HS256 JWT signed with FLASHSALE_JWT_SECRET; `sub` = user id "
            f"(1–{bounds.USER_ID_MAX_CHARS} chars), `exp` required. Mint one with "
            "`flashsale token USER_ID`.",
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
                "schema": {"type": "integer", "minimum": 0},
            }
        },
        "securitySchemes": _security_schemes(),
    }
