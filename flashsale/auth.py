"""Identity: buyer JWTs (HS256, ``sub`` and ``exp`` required) and the admin token."""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict

import jwt

from flashsale.errors import Unauthorized
from flashsale.schemas import bounds

USER_ID_MAX = bounds.USER_ID_MAX_CHARS
TOKEN_MAX_CHARS = 4096
CACHE_MAX = 50_000
EXP_CACHE_MAX = 2**53  # seconds; beyond it a token is verified every time


def bearer(header: str | None) -> str:
    if not header or not header.startswith("Bearer "):
        raise Unauthorized("a bearer token is required")
    token = header[7:].strip()
    if not token or len(token) > TOKEN_MAX_CHARS:
        raise Unauthorized()
    return token


def valid_user_id(sub: object) -> str:
    """The user id a token names: 1-64 characters, valid Unicode (a lone
    surrogate such as JSON "\\ud800" cannot be encoded as UTF-8, so Redis could
    never be sent it) and no control characters (the reservation batch packs
    its fields with the unit separator, records with tabs and newlines)."""
    if not isinstance(sub, str) or not 1 <= len(sub) <= USER_ID_MAX:
        raise Unauthorized("the token's sub must be a string of 1-64 characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in sub):
        raise Unauthorized("the token's sub must not contain control characters")
    try:
        sub.encode()
    except UnicodeEncodeError:
        raise Unauthorized("the token's sub must be valid Unicode (no lone surrogates)") from None
    return sub


def mint(secret: str, user_id: str, ttl_s: int = 3600, now: float | None = None) -> str:
    issued = int(time.time() if now is None else now)
    valid_user_id(user_id)
    return jwt.encode({"sub": user_id, "iat": issued, "exp": issued + ttl_s}, secret, "HS256")


class Authenticator:
    """Verifies buyer tokens (with a bounded cache of verified tokens until
    their expiry) and the admin token (constant-time compare)."""

    def __init__(self, jwt_secret: str, admin_token: str) -> None:
        self._secret = jwt_secret
        self._admin = admin_token.encode()
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def buyer(self, header: str | None) -> str:
        token = bearer(header)
        hit = self._cache.get(token)
        now = time.time()
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=["HS256"],
                options={"require": ["exp", "sub"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired") from None
        except jwt.PyJWTError:
            raise Unauthorized("the token is invalid") from None
        user_id = valid_user_id(claims.get("sub"))
        exp = claims["exp"]
        # cache until exp; an absurd exp (e.g. 10**400, valid for PyJWT) is not
        # cached, since float() of it would overflow
        if isinstance(exp, int | float) and exp < EXP_CACHE_MAX:
            if len(self._cache) >= CACHE_MAX:
                self._cache.popitem(last=False)
            self._cache[token] = (user_id, float(exp))
        return user_id

    def admin(self, header: str | None) -> None:
        token = bearer(header)
        if not hmac.compare_digest(token.encode(), self._admin):
            raise Unauthorized("the admin token is invalid")
