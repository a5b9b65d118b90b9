"""Webhook signatures: HMAC-SHA256 over "<t>.<raw body>", 300 s either way."""

from __future__ import annotations

import pytest

from flashsale import errors
from flashsale.commerce.payment import Event
from flashsale.commerce.signature import signature, verify

SECRET = "whsec-0123456789abcdef"
BODY = (b'{"event_id":"evt_1","type":"payment.succeeded","payment_id":"pay_1",'
        b'"order_id":"o_1","amount_cents":100}')
NOW = 1_700_000_000


def _verify(header: str | None, body: bytes = BODY, now: float = NOW) -> None:
    verify(SECRET, header, body, now, 300)


def test_a_good_signature_verifies_within_the_tolerance() -> None:
    for t in (NOW, NOW - 300, NOW + 300):
        _verify(signature(SECRET, t, BODY))
    sig = signature(SECRET, NOW, BODY)
    assert sig.startswith(f"t={NOW},v1=") and len(sig.rsplit("=", 1)[1]) == 64
    _verify(sig.upper().replace("T=", "t=").replace("V1=", "v1="))  # hex case


@pytest.mark.parametrize(
    "header",
    [
        None, "", "garbage", "t=,v1=", f"t={NOW}", "v1=" + "0" * 64, f"t=x{NOW},v1=" + "0" * 64,
        f"t={NOW},v1=" + "0" * 64, f"t={NOW},v1=nothex", "t=1" + "0" * 20 + ",v1=00",
        "x" * 2000, signature("another-secret-0123456789", NOW, BODY),
        signature(SECRET, NOW - 301, BODY), signature(SECRET, NOW + 301, BODY),
        signature(SECRET, NOW, BODY + b" "), signature(SECRET, NOW + 1, BODY).replace(
            f"t={NOW + 1}", f"t={NOW}"),
    ],
)
def test_anything_else_is_rejected(header: str | None) -> None:
    with pytest.raises(errors.InvalidSignature) as info:
        _verify(header)
    assert (info.value.status, info.value.code) == (400, "invalid_signature")


def test_one_changed_byte_of_the_body_is_rejected() -> None:
    sig = signature(SECRET, NOW, BODY)
    for i in range(len(BODY)):
        changed = bytearray(BODY)
        changed[i] ^= 0x01
        with pytest.raises(errors.InvalidSignature):
            _verify(sig, bytes(changed))


def test_a_rotated_secret_may_sign_beside_the_current_one() -> None:
    old = signature("old-secret-0123456789ab", NOW, BODY).rsplit("=", 1)[1]
    _verify(f"{signature(SECRET, NOW, BODY)},v1={old}")
    _verify(f"t={NOW},v1={old},{signature(SECRET, NOW, BODY).split(',')[1]}")


def test_the_event_body_is_parsed_strictly() -> None:
    ev = Event.parse(BODY)
    assert (ev.event_id, ev.type, ev.amount_cents) == ("evt_1", "payment.succeeded", 100)
    for bad in (b"", b"[]", b"{", BODY.replace(b"100", b"-1"), BODY.replace(b"100", b"1.5"),
                BODY.replace(b"payment.succeeded", b"payment.refunded"),
                BODY.replace(b'"amount_cents"', b'"amount"'), BODY[:-1] + b',"x":1}'):
        with pytest.raises(errors.InvalidRequest):
            Event.parse(bad)
