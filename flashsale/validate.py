"""What JSON Schema cannot check: timestamps, ids and keys; and the rendering of times.

Request bodies are decoded into their shapes (flashsale/schemas); this
module parses what a shape carries as text (a sale's timestamps) and checks
the ids of paths and headers against the patterns of flashsale/schemas/bounds.py.
Every failure raises InvalidRequest with a message naming the field.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

from msgspec import UNSET, UnsetType

from flashsale.errors import InvalidRequest, SaleNotFound
from flashsale.schemas import bounds

SALE_ID_RE: Final = re.compile(bounds.SALE_ID_PATTERN)
ORDER_ID_RE: Final = re.compile(bounds.ORDER_ID_PATTERN)
PAYMENT_ID_RE: Final = re.compile(bounds.PAYMENT_ID_PATTERN)
IDEMPOTENCY_KEY_RE: Final = re.compile(bounds.IDEMPOTENCY_KEY_PATTERN)
# Match these with .fullmatch(): in Python `$` also matches before a trailing
# newline ("sl_abcdefghij12\n" would pass .match). The patterns keep `$` so they
# read as the OpenAPI (ECMA-262) patterns do.


def timestamp(
    name: str, value: object | UnsetType, default: datetime | None
) -> datetime | None:
    """ISO-8601 with an explicit offset (UTC expected); ``UNSET`` (absent) is ``default``;
    null allowed only when ``default`` is None."""
    if value is UNSET:
        return default
    if value is None:
        if default is None:
            return None
        raise InvalidRequest(f"{name} must not be null")
    if not isinstance(value, str) or len(value) > bounds.TIMESTAMP_MAX_CHARS:
        raise InvalidRequest(f"{name} must be an ISO-8601 UTC timestamp")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{name} must be an ISO-8601 UTC timestamp") from None
    if parsed.tzinfo is None:
        raise InvalidRequest(f"{name} must carry a UTC offset (e.g. 2026-01-01T00:00:00Z)")
    lo, hi = bounds.TIMESTAMP_YEARS
    if not lo <= parsed.year <= hi:
        raise InvalidRequest(f"{name} is out of range")
    return parsed.astimezone(UTC)


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_ms(ms: int) -> str:
    return iso(datetime.fromtimestamp(ms / 1000, tz=UTC)) or ""


def sale_id(value: str) -> str:
    if not SALE_ID_RE.fullmatch(value):
        raise SaleNotFound()
    return value


def order_sale_id(order_id: str) -> str | None:
    """The sale an order id belongs to, or None when the id is malformed."""
    m = ORDER_ID_RE.fullmatch(order_id)
    return m.group(1) if m else None
