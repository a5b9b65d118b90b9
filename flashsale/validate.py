"""Strict request parsing: JSON objects, exact types, bounds, no unknown fields.

Every failure raises InvalidRequest with a message naming the field.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from flashsale.errors import InvalidRequest


class _Missing:
    pass


MISSING: Final = _Missing()

SALE_ID_RE = re.compile(r"^sl_[a-z0-9]{12}$")
ORDER_ID_RE = re.compile(r"^(sl_[a-z0-9]{12})-[0-9a-f]{21}$")
IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]{0,126}[\x21-\x7e])?$")
# Match these with .fullmatch(): in Python `$` also matches before a trailing
# newline ("sl_abcdefghij12\n" would pass .match). The patterns keep `$` so they
# read as the OpenAPI (ECMA-262) patterns do.


def json_object(raw: bytes, *, allow_empty: bool = False) -> dict[str, Any]:
    if not raw.strip():
        if allow_empty:
            return {}
        raise InvalidRequest("the request body must be a JSON object")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return value


def no_unknown(body: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}")


def integer(
    body: dict[str, Any], name: str, lo: int, hi: int, default: int | _Missing = MISSING
) -> int:
    if name not in body:
        if isinstance(default, _Missing):
            raise InvalidRequest(f"{name} is required")
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer")
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi}")
    return value


def text(body: dict[str, Any], name: str, lo: int, hi: int) -> str:
    value = body.get(name, MISSING)
    if isinstance(value, _Missing):
        raise InvalidRequest(f"{name} is required")
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string")
    if not lo <= len(value) <= hi:
        raise InvalidRequest(f"{name} must be {lo}-{hi} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise InvalidRequest(f"{name} must not contain control characters")
    return value


def timestamp(body: dict[str, Any], name: str, default: datetime | None) -> datetime | None:
    """ISO-8601 with an explicit offset (UTC expected); null allowed when default is None."""
    if name not in body:
        return default
    value = body[name]
    if value is None:
        if default is None:
            return None
        raise InvalidRequest(f"{name} must not be null")
    if not isinstance(value, str) or len(value) > 40:
        raise InvalidRequest(f"{name} must be an ISO-8601 UTC timestamp")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{name} must be an ISO-8601 UTC timestamp") from None
    if parsed.tzinfo is None:
        raise InvalidRequest(f"{name} must carry a UTC offset (e.g. 2026-01-01T00:00:00Z)")
    if not 2000 <= parsed.year <= 9000:
        raise InvalidRequest(f"{name} is out of range")
    return parsed.astimezone(UTC)


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_ms(ms: int) -> str:
    return iso(datetime.fromtimestamp(ms / 1000, tz=UTC)) or ""


def sale_id(value: str) -> str:
    from flashsale.errors import SaleNotFound

    if not SALE_ID_RE.fullmatch(value):
        raise SaleNotFound()
    return value


def order_sale_id(order_id: str) -> str | None:
    """The sale an order id belongs to, or None when the id is malformed."""
    m = ORDER_ID_RE.fullmatch(order_id)
    return m.group(1) if m else None
