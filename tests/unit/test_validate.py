"""flashsale.validate: the strict parsing every request body and id goes through."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashsale import validate
from flashsale.errors import InvalidRequest, SaleNotFound
from flashsale.web import openapi

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


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
        validate.json_object(raw)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"{}", {}),
        (b' {"quantity": 2}\n', {"quantity": 2}),
        (b'{"a": {"b": [1, 2]}}', {"a": {"b": [1, 2]}}),
        (b'{"q": 1, "q": 2}', {"q": 2}),  # duplicate keys: the last wins (orjson)
        ('{"name": "Café ☕"}'.encode(), {"name": "Café ☕"}),
    ],
)
def test_json_object_accepts(raw: bytes, value: dict[str, Any]) -> None:
    assert validate.json_object(raw) == value


def test_json_object_allow_empty() -> None:
    assert validate.json_object(b"", allow_empty=True) == {}
    assert validate.json_object(b"  \n", allow_empty=True) == {}
    with pytest.raises(InvalidRequest):
        validate.json_object(b"[]", allow_empty=True)


def test_json_object_message_has_no_input_echo() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate.json_object(b'{"secret": "hunter2"')
    assert "hunter2" not in info.value.message


# -- no_unknown ---------------------------------------------------------------------


def test_no_unknown() -> None:
    validate.no_unknown({}, frozenset({"a"}))
    validate.no_unknown({"a": 1}, frozenset({"a", "b"}))
    with pytest.raises(InvalidRequest) as info:
        validate.no_unknown({"a": 1, "z": 2, "y": 3}, frozenset({"a"}))
    assert info.value.message == "unknown field(s): y, z"
    assert info.value.status == 400 and info.value.code == "invalid_request"


# -- integer ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [0, -1, 11, 1.0, 1.5, "1", "", None, True, False, [1], {"v": 1}, 2**63, 10**20,
     float("nan"), float("inf")],
)
def test_integer_rejects(value: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate.integer({"q": value}, "q", 1, 10)
    assert "q" in info.value.message


@pytest.mark.parametrize("value", [1, 5, 10])
def test_integer_accepts_bounds_inclusive(value: int) -> None:
    assert validate.integer({"q": value}, "q", 1, 10) == value


def test_integer_missing_and_default() -> None:
    with pytest.raises(InvalidRequest, match="q is required"):
        validate.integer({}, "q", 1, 10)
    assert validate.integer({}, "q", 1, 10, 1) == 1
    assert validate.integer({}, "q", 1, 10, 0) == 0  # a default is not range-checked
    with pytest.raises(InvalidRequest):  # present-but-null is not "missing"
        validate.integer({"q": None}, "q", 1, 10, 1)


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_integer_accepts_exactly_the_range(value: int) -> None:
    lo, hi = -5, 1_000_000
    if lo <= value <= hi:
        assert validate.integer({"v": value}, "v", lo, hi) == value
    else:
        with pytest.raises(InvalidRequest):
            validate.integer({"v": value}, "v", lo, hi)


# -- text -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["", "x" * 11, 5, None, True, ["a"], "a\x00b", "a\nb", "tab\t", "\x1f", "del\x7f", "\r"],
)
def test_text_rejects(value: object) -> None:
    with pytest.raises(InvalidRequest):
        validate.text({"s": value}, "s", 1, 10)


@pytest.mark.parametrize("value", ["a", "x" * 10, "Café ☕", "a b", "ключ", "\u00a0nbsp"])
def test_text_accepts(value: str) -> None:
    assert validate.text({"s": value}, "s", 1, 10) == value


def test_text_missing() -> None:
    with pytest.raises(InvalidRequest, match="s is required"):
        validate.text({}, "s", 1, 10)


@given(st.text(max_size=12))
def test_text_rejects_exactly_the_openapi_control_characters(value: str) -> None:
    """Validation and the published OpenAPI schema agree on what is text."""
    bad = bool(re.search(openapi.CONTROL_CHARACTER, value)) or not 1 <= len(value) <= 10
    if bad:
        with pytest.raises(InvalidRequest):
            validate.text({"s": value}, "s", 1, 10)
    else:
        assert validate.text({"s": value}, "s", 1, 10) == value


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
    got = validate.timestamp({"t": raw}, "t", NOW)
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
        validate.timestamp({"t": raw}, "t", NOW)


def test_timestamp_defaults_and_null() -> None:
    assert validate.timestamp({}, "t", NOW) == NOW
    assert validate.timestamp({}, "t", None) is None
    assert validate.timestamp({"t": None}, "t", None) is None  # nullable field (ends_at)
    with pytest.raises(InvalidRequest, match="must not be null"):
        validate.timestamp({"t": None}, "t", NOW)  # non-nullable field (starts_at)


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
    parsed = validate.timestamp({"t": text}, "t", None)
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
    assert validate.IDEMPOTENCY_KEY_RE.pattern == openapi.IDEMPOTENCY_KEY_PATTERN
