"""The waiting room's pass: signed by the server, verified by any front alone.

A pass is ``<payload>.<mac>``, both base64url without padding:
payload = ``"<sale_id>|<ticket_id>|<expires_ms>|<user_id>"`` (the user id last:
it is the only field that may hold a "|"), mac = HMAC-SHA256 over
``"flashsale-pass-v1|" + payload`` with FLASHSALE_PASS_SECRET (a secret of its
own, generated and kept in secrets.json like the JWT secret). It binds sale,
buyer, ticket and expiry, so the front checks it without Redis; that a pass
reserves one order only is lua/reserve_batch-8.lua's (the ticket's "used" entry).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re

from flashsale.errors import PassRequired

PASS_HEADER = "Flashsale-Pass"  # the request header a pass travels in (one owner)
PASS_MAX_CHARS = 512
_DOMAIN = b"flashsale-pass-v1|"
TICKET_ID_RE = re.compile(r"^tk_[0-9a-f]{20}$")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, payload: bytes) -> bytes:
    return hmac.new(secret.encode(), _DOMAIN + payload, hashlib.sha256).digest()


def sign(secret: str, sale_id: str, user_id: str, ticket_id: str, expires_ms: int) -> str:
    payload = f"{sale_id}|{ticket_id}|{expires_ms}|{user_id}".encode()
    return f"{_b64(payload)}.{_b64(_mac(secret, payload))}"


def verify(secret: str, token: str | None, sale_id: str, user_id: str, now_ms: int) -> str:
    """The ticket id the pass names; PassRequired (403) when it is missing,
    forged, expired, another buyer's or another sale's."""
    if not token:
        raise PassRequired()
    if len(token) > PASS_MAX_CHARS or token.count(".") != 1:
        raise PassRequired(f"the {PASS_HEADER} header is not a pass")
    head, _, mac = token.partition(".")
    try:
        payload, got = _unb64(head), _unb64(mac)
    except (binascii.Error, ValueError):
        raise PassRequired(f"the {PASS_HEADER} header is not a pass") from None
    if not hmac.compare_digest(got, _mac(secret, payload)):
        raise PassRequired("the pass is not valid (not signed by this service)")
    try:
        p_sale, ticket, exp, p_user = payload.decode().split("|", 3)
        expires_ms = int(exp)
    except ValueError:
        raise PassRequired("the pass is not valid") from None
    if p_sale != sale_id:
        raise PassRequired("the pass is for another sale")
    if p_user != user_id:
        raise PassRequired("the pass is another buyer's")
    if expires_ms <= now_ms:
        raise PassRequired("the pass has expired")
    return ticket
