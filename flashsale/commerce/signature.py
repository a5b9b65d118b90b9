"""The webhook signature: what the gateway sends (``Flashsale-Signature:
t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``) and how the
front verifies it. The one owner: the payment webhook and the mock gateway
both import it."""

from __future__ import annotations

import hashlib
import hmac

from flashsale import errors

SIGNATURE_HEADER = "Flashsale-Signature"
SIGNATURE_HEADER_MAX_CHARS = 1024
SIGNATURES_MAX = 4


def signature(secret: str, t: int, raw_body: bytes) -> str:
    """The header value a gateway sends: ``t=<t>,v1=<hex HMAC-SHA256>``."""
    mac = hmac.new(secret.encode(), str(t).encode() + b"." + raw_body, hashlib.sha256)
    return f"t={t},v1={mac.hexdigest()}"


def _parse_header(header: str) -> tuple[int, list[str]]:
    t: int | None = None
    v1: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise errors.InvalidSignature("the signature header is malformed")
        if name == "t" and t is None and value.isascii() and value.isdigit() and len(value) <= 12:
            t = int(value)
        elif name == "v1" and len(v1) < SIGNATURES_MAX:
            v1.append(value.lower())
    if t is None or not v1:
        raise errors.InvalidSignature("the signature header needs t=<unix seconds>,v1=<hex>")
    return t, v1


def verify(
    secret: str, header: str | None, raw_body: bytes, now_s: float, tolerance_s: int
) -> None:
    """Raise InvalidSignature unless ``header`` signs ``raw_body`` with ``secret``
    and its timestamp is within ``tolerance_s`` of ``now_s`` (past or future)."""
    if not header or len(header) > SIGNATURE_HEADER_MAX_CHARS:
        raise errors.InvalidSignature(f"the {SIGNATURE_HEADER} header is missing")
    t, candidates = _parse_header(header)
    if abs(now_s - t) > tolerance_s:
        raise errors.InvalidSignature("the signature timestamp is outside the tolerance")
    expected = signature(secret, t, raw_body).rsplit("=", 1)[1]
    matched = False
    for candidate in candidates:  # every candidate compared: no early exit
        matched |= hmac.compare_digest(expected.encode(), candidate.encode("ascii", "replace"))
    if not matched:
        raise errors.InvalidSignature("the signature does not match")
