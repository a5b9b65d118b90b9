"""The published schema and the server's decoder accept exactly the same request bodies.

Hypothesis draws JSON objects around each request shape (its fields and
strangers, values of every JSON type, bounds ± 1, control characters); the
OpenAPI document's schema (a JSON Schema validator) and the server's
BodyReader must agree on each, with no exception: a number with a zero
fraction (``2.0``) is an ``integer`` to JSON Schema and to flashsale alike.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_schema_validator import OAS31Validator

from flashsale.errors import InvalidRequest
from flashsale.schemas import bodies, bounds
from flashsale.schemas.decode import BodyReader
from flashsale.schemas.fields import INTEGER_NOTE
from flashsale.web.openapi import build_openapi

DOC = build_openapi()
EDGES = (0, 1, 2, 10, 299, bounds.MAX_QUANTITY, bounds.MAX_QUANTITY + 1, bounds.MAX_AMOUNT_CENTS,
         bounds.MAX_AMOUNT_CENTS + 1, -1, 2**63, 2**64)
VALUES = st.one_of(
    st.sampled_from(EDGES), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([float(x) for x in EDGES[:8]]),
    st.text(max_size=12), st.sampled_from(["payment.succeeded", "payment.failed", "succeeded",
                                           "failed", "a\x00b", "x" * 81, "x" * 201]),
    st.booleans(), st.none(), st.lists(st.integers(), max_size=2),
)
# (shape, its field names): stranger keys are drawn beside them
SHAPES = [
    (bodies.OrderCreate, ("quantity",)),
    (bodies.Restock, ("quantity",)),
    (bodies.GatewaySettle, ("outcome",)),
    (bodies.WebhookEvent, ("event_id", "type", "payment_id", "order_id", "amount_cents")),
    # the waiting room (v1.1): the sale body's nested object and the admin PATCH
    (bodies.WaitingRoom, ("admit_per_s", "pass_seconds", "oversubscribe")),
    (bodies.WaitingRoomPatch, ("admit_per_s", "paused")),
]


def _validator(name: str) -> OAS31Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": DOC["components"]}
    return OAS31Validator(schema)


@pytest.mark.parametrize(("shape", "names"), SHAPES, ids=lambda v: getattr(v, "__name__", ""))
def test_schema_and_decoder_agree(shape: type[Any], names: tuple[str, ...]) -> None:
    validator = _validator(shape.__name__)
    reader = BodyReader(shape)
    keys = st.sampled_from([*names, "extra", "status"])

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(keys, VALUES, max_size=len(names) + 1)
           | st.fixed_dictionaries({n: VALUES for n in names}))
    def check(body: dict[str, Any]) -> None:
        schema_ok = validator.is_valid(body)
        try:
            reader(json.dumps(body).encode())
            server_ok = True
        except InvalidRequest:
            server_ok = False
        assert schema_ok == server_ok, (body, schema_ok, server_ok)

    check()


def test_every_request_integer_states_the_rule() -> None:
    """Each integer field of a request body is JSON Schema's ``integer`` and says what that
    admits (``2.0`` yes, ``2.5`` no), as the decoder does."""
    schemas = DOC["components"]["schemas"]
    seen = 0
    for shape in bodies.REQUEST_BODIES:
        for name, prop in schemas[shape.__name__]["properties"].items():
            if prop.get("type") == "integer":
                assert INTEGER_NOTE in prop.get("description", ""), (shape.__name__, name)
                seen += 1
    assert seen >= 7
