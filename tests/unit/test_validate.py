"""The strict parsing every request body and id goes through: bodies decoded into their
shapes (flashsale/schemas/decode.py), timestamps, ids and keys (flashsale/validate.py).

The body checks run through the real decoder (BodyReader) on small shapes built
with the field helpers flashsale/schemas/bodies.py uses, so they pin the
mechanism every body goes through."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any

import msgspec
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from msgspec import UNSET

from flashsale import validate
from flashsale.errors import InvalidRequest, SaleNotFound
from flashsale.schemas import bounds, fields
from flashsale.schemas.decode import BodyReader
from flashsale.web.openapi import build_openapi

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
_OBJECT = BodyReader(dict[str, Any])
_OBJECT_OR_EMPTY = BodyReader(dict[str, Any], empty_ok=True)


def _raw(body: dict[str, Any]) -> bytes:
    try:
        return json.dumps(body, allow_nan=False).encode()
    except ValueError:  # NaN / Infinity are not JSON: what a client's encoder would send
        return orjson.dumps(body)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int, *default: int) -> int:
    """``body[name]`` decoded as a shape's integer field in lo..hi (optional with ``default``)."""
    kind = Annotated[int, fields.integer(lo, hi)]
    field = (name, kind, default[0]) if default else (name, kind)
    shape = msgspec.defstruct("IntBody", [field], bases=(fields.Shape,))
    value: int = getattr(BodyReader(shape)(_raw(body)), name)
    return value


def _text(body: dict[str, Any], name: str, lo: int, hi: int) -> str:
    """``body[name]`` decoded as a shape's text field (fields.text + plain_text)."""
    assert lo == 1  # fields.text: 1..max_chars

    def post_init(self: Any) -> None:
        fields.plain_text(name, getattr(self, name))

    shape = msgspec.defstruct(
        "TextBody", [(name, Annotated[str, fields.text(hi)])], bases=(fields.Shape,),
        namespace={"__post_init__": post_init},
    )
    value: str = getattr(BodyReader(shape)(_raw(body)), name)
    return value


def _no_unknown(body: dict[str, Any], allowed: frozenset[str]) -> None:
    shape = msgspec.defstruct(
        "Fields", [(f, Any, None) for f in sorted(allowed)], bases=(fields.Shape,)
    )
    BodyReader(shape)(_raw(body))


# -- json_object ------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"", b"   ", b"\n\t ", b"{", b"{'a': 1}", b"[]", b"[{}]", b'"x"', b"1", b"1.5", b"null",
        b"true", b"NaN", b'{"a": NaN}', b"{} {}", b"{} x", b"\xef\xbb\xbf{}", b"\x00{}",
        b'{"a": "\xff"}', b"[" * 2000 + b"]" * 2000, b'{"a": Infinity}',
    ],
)
def test_json_object_rejects(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        _OBJECT(raw)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"{}", {}),
        (b' {"quantity": 2}\n', {"quantity": 2}),
        (b'{"a": {"b": [1, 2]}}', {"a": {"b": [1, 2]}}),
        (b'{"q": 1, "q": 2}', {"q": 2}),  # duplicate keys: the last wins (msgspec)
        ('{"name": "Café ☕"}'.encode(), {"name": "Café ☕"}),
    ],
)
def test_json_object_accepts(raw: bytes, value: dict[str, Any]) -> None:
    assert _OBJECT(raw) == value


def test_json_object_allow_empty() -> None:
    assert _OBJECT_OR_EMPTY(b"") == {}
    assert _OBJECT_OR_EMPTY(b"  \n") == {}
    with pytest.raises(InvalidRequest):
        _OBJECT_OR_EMPTY(b"[]")


def test_json_object_message_has_no_input_echo() -> None:
    with pytest.raises(InvalidRequest) as info:
        _OBJECT(b'{"secret": "hunter2"')
    assert "hunter2" not in info.value.message


# -- no_unknown ---------------------------------------------------------------------


def test_no_unknown() -> None:
    _no_unknown({}, frozenset({"a"}))
    _no_unknown({"a": 1}, frozenset({"a", "b"}))
    with pytest.raises(InvalidRequest) as info:
        _no_unknown({"a": 1, "z": 2, "y": 3}, frozenset({"a"}))
    assert info.value.message == "unknown field(s): y, z"
    assert info.value.status == 400 and info.value.code == "invalid_request"


# -- integer ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [0, -1, 11, 0.0, 11.0, 1.5, "1", "", None, True, False, [1], {"v": 1}, 2**63, 10**20,
     float("nan"), float("inf")],
)
def test_integer_rejects(value: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        _integer({"q": value}, "q", 1, 10)
    assert "q" in info.value.message


@pytest.mark.parametrize("value", [1, 5, 10, 1.0, 10.0, 5e0])
def test_integer_accepts_bounds_inclusive(value: float) -> None:
    """JSON Schema's integer: a number with a zero fraction is that integer."""
    got = _integer({"q": value}, "q", 1, 10)
    assert got == value and type(got) is int


def test_integer_missing_and_default() -> None:
    with pytest.raises(InvalidRequest, match="q is required"):
        _integer({}, "q", 1, 10)
    assert _integer({}, "q", 1, 10, 1) == 1
    assert _integer({}, "q", 1, 10, 0) == 0  # a default is not range-checked
    with pytest.raises(InvalidRequest):  # present-but-null is not "missing"
        _integer({"q": None}, "q", 1, 10, 1)


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_integer_accepts_exactly_the_range(value: int) -> None:
    lo, hi = -5, 1_000_000
    if lo <= value <= hi:
        assert _integer({"v": value}, "v", lo, hi) == value
    else:
        with pytest.raises(InvalidRequest):
            _integer({"v": value}, "v", lo, hi)


# -- text -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["", "x" * 11, 5, None, True, ["a"], "a\x00b", "a\nb", "tab\t", "\x1f", "del\x7f", "\r"],
)
def test_text_rejects(value: object) -> None:
    with pytest.raises(InvalidRequest):
        _text({"s": value}, "s", 1, 10)


@pytest.mark.parametrize("value", ["a", "x" * 10, "Café ☕", "a b", "ключ", "\u00a0nbsp"])
def test_text_accepts(value: str) -> None:
    assert _text({"s": value}, "s", 1, 10) == value


def test_text_missing() -> None:
    with pytest.raises(InvalidRequest, match="s is required"):
        _text({}, "s", 1, 10)


@given(st.text(max_size=12))
def test_text_rejects_exactly_the_openapi_control_characters(value: str) -> None:
    """Validation and the published OpenAPI schema agree on what is text."""
    bad = bool(re.search(bounds.CONTROL_CHARACTER, value)) or not 1 <= len(value) <= 10
    if bad:
        with pytest.raises(InvalidRequest):
            _text({"s": value}, "s", 1, 10)
    else:
        assert _text({"s": value}, "s", 1, 10) == value


# -- timestamp ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2030-01-01T00:00:00Z", datetime(2030, 1, 1, tzinfo=UTC)),
        ("2030-01-01T00:00:00z", datetime(2030, 1, 1, tzinfo=UTC)),
        ("2030-01-01T00:00:00+00:00", datetime(2030, 1, 1, tzinfo=UTC)),
        ("2030-01-01T02:00:00+02:00", datetime(2030, 1, 1, tzinfo=UTC)),
        ("2029-12-31T19:00:00-05:00", datetime(2030, 1, 1, tzinfo=UTC)),
        ("2030-01-01T00:00:00.123Z", datetime(2030, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)),
        ("2030-01-01 00:00:00Z", datetime(2030, 1, 1, tzinfo=UTC)),
    ],
)
def test_timestamp_accepts_and_normalises_to_utc(raw: str, expected: datetime) -> None:
    got = validate.timestamp("t", raw, NOW)
    assert got == expected
    assert got is not None and got.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "raw",
    [
        "2030-01-01T00:00:00",  # no offset
        "2030-01-01",  # a date: no offset either
        "next tuesday", "", "2030-13-01T00:00:00Z", "2030-02-30T00:00:00Z",
        "2030-01-01T24:00:00Z", "2030-01-01T00:00:00+25:00", "2030-01-01T00:00:00ZZ",
        "1999-12-31T23:59:59Z", "9001-01-01T00:00:00Z", "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59-14:00", "2030-01-01T00:00:00Z" + " " * 30,
        1893456000, 1.5, True, ["2030-01-01T00:00:00Z"], {},
    ],
)
def test_timestamp_rejects(raw: object) -> None:
    with pytest.raises(InvalidRequest):
        validate.timestamp("t", raw, NOW)


def test_timestamp_defaults_and_null() -> None:
    assert validate.timestamp("t", UNSET, NOW) == NOW
    assert validate.timestamp("t", UNSET, None) is None
    assert validate.timestamp("t", None, None) is None  # nullable field (ends_at)
    with pytest.raises(InvalidRequest, match="must not be null"):
        validate.timestamp("t", None, NOW)  # non-nullable field (starts_at)


# -- rendering ----------------------------------------------------------------------


def test_iso_renders_utc_with_milliseconds_and_z() -> None:
    assert validate.iso(None) is None
    assert validate.iso(datetime(2030, 1, 1, tzinfo=UTC)) == "2030-01-01T00:00:00.000Z"
    plus2 = timezone(timedelta(hours=2))
    assert validate.iso(datetime(2030, 1, 1, 2, 0, 0, 999999, tzinfo=plus2)) == (
        "2030-01-01T00:00:00.999Z"
    )
    assert validate.iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert validate.iso_ms(1_893_456_000_123) == "2030-01-01T00:00:00.123Z"


# hypothesis takes naive bounds and attaches the timezone itself
@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(9000, 1, 1),  # noqa: DTZ001
                    timezones=st.just(UTC)))
def test_iso_round_trips_through_timestamp(dt: datetime) -> None:
    text = validate.iso(dt)
    assert text is not None
    parsed = validate.timestamp("t", text, None)
    assert parsed == dt.replace(microsecond=dt.microsecond // 1000 * 1000)


# -- ids and keys ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["sl_abcdefghij12", "sl_000000000000"])
def test_sale_id_accepts(value: str) -> None:
    assert validate.sale_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "", "sl_", "sl_abc", "sl_ABCDEFGHIJ12", "SL_abcdefghij12", "sl_abcdefghij123",
        "sl_abcdefghij1", "xsl_abcdefghij12", "sl_abcdefghij12\n", "sl_abcdefghij12 ",
        " sl_abcdefghij12", "sl_abcdefghij1\u0661", "sl_abcdefghij12/x", "sl_abc-efghij12",
    ],
)
def test_sale_id_rejects_as_not_found(value: str) -> None:
    with pytest.raises(SaleNotFound):
        validate.sale_id(value)


def test_order_sale_id() -> None:
    good = "sl_abcdefghij12-0123456789abcdef01234"
    assert validate.order_sale_id(good) == "sl_abcdefghij12"
    for bad in (
        "", "nope", good + "\n", good + "5", good[:-1], good.upper(), "x" + good,
        "sl_abcdefghij12_0123456789abcdef01234", "sl_abcdefghij12-0123456789ABCDEF01234",
    ):
        assert validate.order_sale_id(bad) is None, bad


def _key_ok(key: str) -> bool:
    return bool(validate.IDEMPOTENCY_KEY_RE.fullmatch(key))


@pytest.mark.parametrize("key", ["a", "k" * 128, "order 1", "~!@#$%^&*()_+{}|:<>?", "a  b"])
def test_idempotency_key_accepts(key: str) -> None:
    assert _key_ok(key)


@pytest.mark.parametrize(
    "key",
    ["", "k" * 129, " lead", "trail ", " ", "a\tb", "a\nb", "key\n", "ключ", "a\x00b",
     "a\x7fb", "é"],
)
def test_idempotency_key_rejects(key: str) -> None:
    assert not _key_ok(key)


@given(st.text(alphabet=st.characters(max_codepoint=0x3FF), max_size=140))
def test_idempotency_key_is_1_to_128_printable_ascii(key: str) -> None:
    expected = (
        1 <= len(key) <= 128
        and all(0x20 <= ord(c) <= 0x7E for c in key)
        and key[0] != " " and key[-1] != " "
    )
    assert _key_ok(key) == expected
    assert _key_ok(key + "\n") is False


def test_idempotency_key_pattern_is_the_published_one() -> None:
    published = build_openapi()["components"]["parameters"]["IdempotencyKey"]["schema"]
    assert validate.IDEMPOTENCY_KEY_RE.pattern == published["pattern"]
    assert published["pattern"] == bounds.IDEMPOTENCY_KEY_PATTERN
