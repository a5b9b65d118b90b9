"""The building blocks of every shape: the base Struct and the field types they share.

A field type is an ``Annotated`` type whose ``msgspec.Meta`` carries its
bounds and description: msgspec enforces the bounds when it decodes a
request, and ``msgspec.json.schema_components`` writes them (and the
description) into the OpenAPI document. One declaration, both uses.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

from flashsale.schemas import bounds

_CONTROL: Final = re.compile(bounds.CONTROL_CHARACTER)
TEXT_NOTE: Final = "No control characters."
ENUM_ORDER: Final = "x-enum-order"
INTEGER_NOTE: Final = (
    "An integer as JSON Schema counts one: `2`, `2.0` and `2e0` are the same; "
    "`2.5`, `\"2\"` and `true` are 400 `invalid_request`."
)


class Shape(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A closed JSON object: an unknown field is an error (``additionalProperties: false``)."""


def text(max_chars: int, description: str = "") -> Meta:
    """Human text of 1..max_chars characters; :func:`plain_text` refuses control characters."""
    return Meta(
        min_length=1, max_length=max_chars,
        description=f"{description} {TEXT_NOTE}".strip(),
        extra_json_schema={"not": {"pattern": bounds.CONTROL_CHARACTER}},
    )


def plain_text(name: str, value: str) -> None:
    """The check JSON Schema states as ``not: {pattern: CONTROL_CHARACTER}``: run it from
    ``__post_init__`` for every :func:`text` field (msgspec reports it as a ValidationError)."""
    if _CONTROL.search(value):
        raise ValueError(f"{name} must not contain control characters")


def integer(lo: int, hi: int | None = None, description: str = "", *, request: bool = True) -> Meta:
    """An integer in lo..hi; in a request, any JSON number with a zero fraction
    (JSON Schema's ``integer``: flashsale/schemas/decode.py)."""
    note = f"{description} {INTEGER_NOTE}" if request else description
    return Meta(ge=lo, le=hi, description=note.strip() or None)


def choice(values: tuple[str, ...], description: str) -> Meta:
    """For a ``Literal`` field: the document lists ``values`` in their declared order
    (msgspec sorts an enum; flashsale/web/openapi.py puts ENUM_ORDER back in its place);
    decoding checks the Literal itself."""
    return Meta(description=description, extra_json_schema={ENUM_ORDER: list(values)})


def timestamp(description: str) -> Meta:
    return Meta(description=description, extra_json_schema={"format": "date-time"})


# ids as responses carry them (path parameters: flashsale/web/openapi.py)
_ID: Final = {"pattern": bounds.PATH_ID_PATTERN}
SaleId = Annotated[str, Meta(description="Sale identifier.", extra_json_schema=_ID)]
OrderId = Annotated[str, Meta(description="Order identifier.", extra_json_schema=_ID)]
UserId = Annotated[
    str, Meta(min_length=1, max_length=bounds.USER_ID_MAX_CHARS,
              description="Buyer id (the JWT `sub` claim).")
]
Quantity = Annotated[int, integer(1, bounds.MAX_QUANTITY, "Number of units.", request=False)]
AmountCents = Annotated[int, integer(0, None, "quantity × price_cents, in cents.", request=False)]
ExpiresAt = Annotated[str, timestamp("When an unpaid order is released (UTC).")]
Count = Annotated[int, Meta(ge=0)]
AnyJson = Annotated[Any, Meta(description="Any JSON value.")]
