"""A table of bad inputs across every endpoint, through real HTTP, Redis and PostgreSQL.

Each row names the request and the exact 4xx status and contract error code it
must get. Every answer must have the contract's error shape
(``{"error": {"code", "message"}}``, ``Content-Type: application/json``), and
no row may change anything: after each row and after the whole table the
sale's ``available``, its ledger, the stream and the row counts of every
table are what they were before the table ran.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
import pytest

from tests import support
from tests.support import JWT_SECRET, Api, running_app

NOW = int(time.time())
HOUR = 3600


def _token(claims: dict[str, Any], secret: str = JWT_SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _signed_raw(payload: str, alg: str = "HS256") -> str:
    """A token signed with the service's secret whose payload is exactly
    ``payload`` (for claims or algorithms PyJWT's encoder would not produce)."""
    header = f'{{"alg":"{alg}","typ":"JWT"}}'
    signing_input = f"{_b64(header.encode())}.{_b64(payload.encode())}"
    digest = {"HS256": hashlib.sha256, "HS512": hashlib.sha512}[alg]
    sig = hmac.new(JWT_SECRET.encode(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(sig)}"


def _unsigned(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, None, algorithm="none")


def _bearer(token: str) -> str:
    return f"Bearer {token}"


VALID = {"sub": "mallory", "exp": NOW + HOUR}

# Authorization header values; "buyer" / "admin" / None are resolved per run.
BAD_AUTH: dict[str, str | None] = {
    "missing": None,
    "not-bearer": "Basic bWFsbG9yeTpwdw==",
    "bearer-empty": "Bearer ",
    "garbled": "Bearer not.a.jwt",
    "wrong-secret": _bearer(_token(VALID, secret="another-secret-0123456789-abcdefghij")),
    "expired": _bearer(_token({"sub": "mallory", "exp": NOW - HOUR})),
    "alg-none": _bearer(_unsigned(VALID)),
    "alg-hs512": _bearer(_signed_raw(f'{{"sub":"mallory","exp":{NOW + HOUR}}}', "HS512")),
    "no-exp": _bearer(_token({"sub": "mallory"})),
    "no-sub": _bearer(_token({"exp": NOW + HOUR})),
    "sub-empty": _bearer(_token({"sub": "", "exp": NOW + HOUR})),
    "sub-65": _bearer(_token({"sub": "u" * 65, "exp": NOW + HOUR})),
    "sub-int": _bearer(_signed_raw(f'{{"sub":42,"exp":{NOW + HOUR}}}')),
    "sub-control": _bearer(_token({"sub": "mal\x01lory", "exp": NOW + HOUR})),
    "exp-string": _bearer(_signed_raw('{"sub":"mallory","exp":"tomorrow"}')),
    "too-long": _bearer("a" * 5000),
    "tampered": _bearer(_token(VALID)[:-2] + "AA"),
}

SALE = "{sale}"
ORDERS = "/api/v1/sales/{sale}/orders"
UNKNOWN_SALE = "sl_000000000000"
UNKNOWN_ORDER = "{sale}-000000000000000000000"


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    status: int
    code: str
    body: bytes | None = None
    auth: str | None = "buyer"  # buyer/owner/other-buyer/admin, a BAD_AUTH name, or None
    headers: dict[str, str] = field(default_factory=dict)


def _j(value: object) -> bytes:
    return orjson.dumps(value)


def _sale_body(**fields: Any) -> bytes:
    body: dict[str, Any] = {"sku": "BAD-1", "name": "Bad", "price_cents": 100, "stock": 5}
    body.update(fields)
    return _j({k: v for k, v in body.items() if v is not _DROP})


_DROP = object()
BAD = "invalid_request"
UNAUTH = "unauthorized"

CASES: list[Case] = [
    # -- POST orders: the body ----------------------------------------------
    Case("order-malformed-json", "POST", ORDERS, 400, BAD, b'{"quantity": 1'),
    Case("order-not-json", "POST", ORDERS, 400, BAD, b"quantity=1"),
    Case("order-invalid-utf8", "POST", ORDERS, 400, BAD, b'{"quantity": "\xff"}'),
    Case("order-json-array", "POST", ORDERS, 400, BAD, b'[{"quantity": 1}]'),
    Case("order-json-string", "POST", ORDERS, 400, BAD, b'"quantity"'),
    Case("order-json-number", "POST", ORDERS, 400, BAD, b"1"),
    Case("order-json-null", "POST", ORDERS, 400, BAD, b"null"),
    Case("order-json-true", "POST", ORDERS, 400, BAD, b"true"),
    Case("order-empty-body", "POST", ORDERS, 400, BAD, b""),
    Case("order-whitespace-body", "POST", ORDERS, 400, BAD, b"  \n"),
    Case("order-nested-too-deep", "POST", ORDERS, 400, BAD, b"[" * 5000 + b"]" * 5000),
    Case("order-nan", "POST", ORDERS, 400, BAD, b'{"quantity": NaN}'),
    Case("order-quantity-0", "POST", ORDERS, 400, BAD, _j({"quantity": 0})),
    Case("order-quantity-negative", "POST", ORDERS, 400, BAD, _j({"quantity": -1})),
    Case("order-quantity-float", "POST", ORDERS, 400, BAD, _j({"quantity": 1.5})),
    # a zero fraction is the integer (JSON Schema's integer, tests/integration/test_shapes.py)
    Case("order-quantity-float-almost-integral", "POST", ORDERS, 400, BAD,
         b'{"quantity": 1.0000001}'),
    Case("order-quantity-float-integral-zero", "POST", ORDERS, 400, BAD, b'{"quantity": 0.0}'),
    Case("order-quantity-exponent-fraction", "POST", ORDERS, 400, BAD, b'{"quantity": 15e-1}'),
    Case("order-quantity-string", "POST", ORDERS, 400, BAD, _j({"quantity": "1"})),
    Case("order-quantity-true", "POST", ORDERS, 400, BAD, _j({"quantity": True})),
    Case("order-quantity-null", "POST", ORDERS, 400, BAD, _j({"quantity": None})),
    Case("order-quantity-list", "POST", ORDERS, 400, BAD, _j({"quantity": [1]})),
    Case("order-quantity-1e20", "POST", ORDERS, 400, BAD, b'{"quantity": 100000000000000000000}'),
    Case("order-quantity-2e63", "POST", ORDERS, 400, BAD, b'{"quantity": 9223372036854775808}'),
    Case("order-quantity-i64-max", "POST", ORDERS, 400, BAD, _j({"quantity": 2**63 - 1})),
    Case("order-unknown-field", "POST", ORDERS, 400, BAD, _j({"quantity": 1, "colour": "red"})),
    Case("order-owned-status", "POST", ORDERS, 400, BAD, _j({"quantity": 1, "status": "paid"})),
    Case("order-owned-user_id", "POST", ORDERS, 400, BAD, _j({"quantity": 1, "user_id": "bob"})),
    Case("order-owned-price_cents", "POST", ORDERS, 400, BAD,
         _j({"quantity": 1, "price_cents": 0})),
    Case("order-owned-amount_cents", "POST", ORDERS, 400, BAD,
         _j({"quantity": 1, "amount_cents": 0})),
    Case("order-owned-order_id", "POST", ORDERS, 400, BAD,
         _j({"quantity": 1, "order_id": "sl_000000000000-000000000000000000000"})),
    Case("order-owned-only", "POST", ORDERS, 400, BAD, _j({"sale_id": "sl_000000000000"})),
    Case("order-body-over-16k", "POST", ORDERS, 400, BAD,
         _j({"quantity": 1, "pad": "x" * (16 * 1024)})),
    Case("order-body-1mib", "POST", ORDERS, 400, BAD, b" " * (1024 * 1024) + b"{}"),
    # -- POST orders: the Idempotency-Key --------------------------------------
    Case("idem-empty", "POST", ORDERS, 400, BAD, _j({"quantity": 1}),
         headers={"Idempotency-Key": ""}),
    Case("idem-129-chars", "POST", ORDERS, 400, BAD, _j({"quantity": 1}),
         headers={"Idempotency-Key": "k" * 129}),
    Case("idem-non-ascii", "POST", ORDERS, 400, BAD, _j({"quantity": 1}),
         headers={"Idempotency-Key": "clé-ключ"}),
    Case("idem-control-tab", "POST", ORDERS, 400, BAD, _j({"quantity": 1}),
         headers={"Idempotency-Key": "a\tb"}),
    # -- POST orders: credentials (checked before anything else) ---------------
    *[
        Case(f"order-auth-{name}", "POST", ORDERS, 401, UNAUTH, _j({"quantity": 1}), auth=name)
        for name in BAD_AUTH
    ],
    Case("order-auth-admin-token", "POST", ORDERS, 401, UNAUTH, _j({"quantity": 1}),
         auth="admin"),
    Case("order-auth-before-body", "POST", ORDERS, 401, UNAUTH, b"not json", auth="expired"),
    # -- POST orders: the sale ---------------------------------------------------
    Case("order-unknown-sale", "POST", f"/api/v1/sales/{UNKNOWN_SALE}/orders", 404,
         "sale_not_found", _j({"quantity": 1})),
    Case("order-malformed-sale-id", "POST", "/api/v1/sales/SL_X'%3B--/orders", 404,
         "sale_not_found", _j({"quantity": 1})),
    Case("order-sale-id-too-long", "POST", "/api/v1/sales/sl_" + "a" * 300 + "/orders", 404,
         "sale_not_found", _j({"quantity": 1})),
    # -- GET sale ------------------------------------------------------------------
    Case("sale-unknown", "GET", f"/api/v1/sales/{UNKNOWN_SALE}", 404, "sale_not_found",
         auth=None),
    Case("sale-malformed-id", "GET", "/api/v1/sales/not-a-sale", 404, "sale_not_found",
         auth=None),
    Case("sale-percent-encoded-nul", "GET", "/api/v1/sales/sl_%00", 404, "sale_not_found",
         auth=None),
    Case("sale-id-trailing-newline", "GET", f"/api/v1/sales/{UNKNOWN_SALE}%0A", 404,
         "sale_not_found", auth=None),
    Case("order-sale-id-trailing-newline", "POST", "/api/v1/sales/{sale}%0A/orders", 404,
         "sale_not_found", _j({"quantity": 1})),
    Case("order-get-id-trailing-newline", "GET", "/api/v1/orders/{order}%0A", 404,
         "order_not_found", auth="owner"),
    # -- POST sales (admin) ---------------------------------------------------------
    Case("create-no-token", "POST", "/api/v1/sales", 401, UNAUTH, _sale_body(), auth=None),
    Case("create-buyer-token", "POST", "/api/v1/sales", 401, UNAUTH, _sale_body()),
    Case("create-wrong-admin", "POST", "/api/v1/sales", 401, UNAUTH, _sale_body(),
         auth="garbled"),
    Case("create-empty-body", "POST", "/api/v1/sales", 400, BAD, b"", auth="admin"),
    Case("create-json-array", "POST", "/api/v1/sales", 400, BAD, b"[]", auth="admin"),
    Case("create-negative-stock", "POST", "/api/v1/sales", 400, BAD, _sale_body(stock=-1),
         auth="admin"),
    Case("create-stock-float", "POST", "/api/v1/sales", 400, BAD, _sale_body(stock=5.5),
         auth="admin"),
    Case("create-stock-1e20", "POST", "/api/v1/sales", 400, BAD,
         _sale_body(stock=_DROP)[:-1] + b', "stock": 100000000000000000000}',
         auth="admin"),
    Case("create-price-string", "POST", "/api/v1/sales", 400, BAD,
         _sale_body(price_cents="100"), auth="admin"),
    Case("create-price-negative", "POST", "/api/v1/sales", 400, BAD,
         _sale_body(price_cents=-1), auth="admin"),
    Case("create-price-u64", "POST", "/api/v1/sales", 400, BAD,
         _sale_body(price_cents=2**64 - 1), auth="admin"),
    Case("create-limit-0", "POST", "/api/v1/sales", 400, BAD, _sale_body(per_user_limit=0),
         auth="admin"),
    Case("create-hold-0", "POST", "/api/v1/sales", 400, BAD, _sale_body(hold_seconds=0),
         auth="admin"),
    Case("create-ends-before-starts", "POST", "/api/v1/sales", 400, BAD,
         _sale_body(starts_at="2030-01-02T00:00:00Z", ends_at="2030-01-01T00:00:00Z"),
         auth="admin"),
    Case("create-ends-equals-starts", "POST", "/api/v1/sales", 400, BAD,
         _sale_body(starts_at="2030-01-01T00:00:00Z", ends_at="2030-01-01T00:00:00Z"),
         auth="admin"),
    Case("create-starts-without-tz", "POST", "/api/v1/sales", 400, BAD,
         _sale_body(starts_at="2030-01-01T00:00:00"), auth="admin"),
    Case("create-starts-garbage", "POST", "/api/v1/sales", 400, BAD,
         _sale_body(starts_at="next tuesday"), auth="admin"),
    Case("create-starts-month-13", "POST", "/api/v1/sales", 400, BAD,
         _sale_body(starts_at="2030-13-01T00:00:00Z"), auth="admin"),
    Case("create-starts-year-1", "POST", "/api/v1/sales", 400, BAD,
         _sale_body(starts_at="0001-01-01T00:00:00+14:00"), auth="admin"),
    Case("create-starts-null", "POST", "/api/v1/sales", 400, BAD,
         _sale_body(starts_at=None), auth="admin"),
    Case("create-starts-number", "POST", "/api/v1/sales", 400, BAD,
         _sale_body(starts_at=1893456000), auth="admin"),
    Case("create-unknown-field", "POST", "/api/v1/sales", 400, BAD, _sale_body(colour="red"),
         auth="admin"),
    Case("create-server-owned-available", "POST", "/api/v1/sales", 400, BAD,
         _sale_body(available=5), auth="admin"),
    Case("create-sku-too-long", "POST", "/api/v1/sales", 400, BAD, _sale_body(sku="S" * 65),
         auth="admin"),
    Case("create-sku-empty", "POST", "/api/v1/sales", 400, BAD, _sale_body(sku=""),
         auth="admin"),
    Case("create-sku-missing", "POST", "/api/v1/sales", 400, BAD, _sale_body(sku=_DROP),
         auth="admin"),
    Case("create-name-control-char", "POST", "/api/v1/sales", 400, BAD,
         _sale_body(name="bad\nname"), auth="admin"),
    Case("create-stock-missing", "POST", "/api/v1/sales", 400, BAD, _sale_body(stock=_DROP),
         auth="admin"),
    Case("create-body-over-16k", "POST", "/api/v1/sales", 400, BAD,
         _sale_body(name="n" * (17 * 1024)), auth="admin"),
    # -- POST restock (admin) --------------------------------------------------------
    Case("restock-quantity-0", "POST", "/api/v1/sales/{sale}/restock", 400, BAD,
         _j({"quantity": 0}), auth="admin"),
    Case("restock-quantity-negative", "POST", "/api/v1/sales/{sale}/restock", 400, BAD,
         _j({"quantity": -5}), auth="admin"),
    Case("restock-quantity-string", "POST", "/api/v1/sales/{sale}/restock", 400, BAD,
         _j({"quantity": "5"}), auth="admin"),
    Case("restock-quantity-missing", "POST", "/api/v1/sales/{sale}/restock", 400, BAD,
         _j({}), auth="admin"),
    Case("restock-unknown-field", "POST", "/api/v1/sales/{sale}/restock", 400, BAD,
         _j({"quantity": 1, "stock": 100}), auth="admin"),
    Case("restock-over-stock-max", "POST", "/api/v1/sales/{sale}/restock", 400, BAD,
         _j({"quantity": 1_000_000_000}), auth="admin"),
    Case("restock-buyer-token", "POST", "/api/v1/sales/{sale}/restock", 401, UNAUTH,
         _j({"quantity": 1})),
    Case("restock-no-token", "POST", "/api/v1/sales/{sale}/restock", 401, UNAUTH,
         _j({"quantity": 1}), auth=None),
    Case("restock-unknown-sale", "POST", f"/api/v1/sales/{UNKNOWN_SALE}/restock", 404,
         "sale_not_found", _j({"quantity": 1}), auth="admin"),
    Case("restock-malformed-sale", "POST", "/api/v1/sales/nope/restock", 404,
         "sale_not_found", _j({"quantity": 1}), auth="admin"),
    # -- GET ledger (admin) ------------------------------------------------------------
    Case("ledger-buyer-token", "GET", "/api/v1/admin/sales/{sale}/ledger", 401, UNAUTH),
    Case("ledger-no-token", "GET", "/api/v1/admin/sales/{sale}/ledger", 401, UNAUTH,
         auth=None),
    Case("ledger-unknown-sale", "GET", f"/api/v1/admin/sales/{UNKNOWN_SALE}/ledger", 404,
         "sale_not_found", auth="admin"),
    Case("ledger-malformed-sale", "GET", "/api/v1/admin/sales/x/ledger", 404,
         "sale_not_found", auth="admin"),
    # -- orders: read and cancel -------------------------------------------------------
    Case("order-get-unknown", "GET", f"/api/v1/orders/{UNKNOWN_ORDER}", 404, "order_not_found"),
    Case("order-get-malformed", "GET", "/api/v1/orders/nope", 404, "order_not_found"),
    Case("order-get-unknown-sale", "GET",
         f"/api/v1/orders/{UNKNOWN_SALE}-000000000000000000000", 404, "order_not_found"),
    Case("order-get-other-buyer", "GET", "/api/v1/orders/{order}", 404, "order_not_found",
         auth="other-buyer"),
    Case("order-get-no-token", "GET", "/api/v1/orders/{order}", 401, UNAUTH, auth=None),
    Case("order-get-expired-token", "GET", "/api/v1/orders/{order}", 401, UNAUTH,
         auth="expired"),
    Case("order-cancel-unknown", "POST", f"/api/v1/orders/{UNKNOWN_ORDER}/cancel", 404,
         "order_not_found"),
    Case("order-cancel-other-buyer", "POST", "/api/v1/orders/{order}/cancel", 404,
         "order_not_found", auth="other-buyer"),
    Case("order-cancel-no-token", "POST", "/api/v1/orders/{order}/cancel", 401, UNAUTH,
         auth=None),
    # -- pay (buyer) -----------------------------------------------------------------
    Case("pay-unknown-order", "POST", f"/api/v1/orders/{UNKNOWN_ORDER}/pay", 404,
         "order_not_found"),
    Case("pay-malformed-order", "POST", "/api/v1/orders/nope/pay", 404, "order_not_found"),
    Case("pay-other-buyer", "POST", "/api/v1/orders/{order}/pay", 404, "order_not_found",
         auth="other-buyer"),
    Case("pay-no-token", "POST", "/api/v1/orders/{order}/pay", 401, UNAUTH, auth=None),
    Case("pay-server-owned-amount", "POST", "/api/v1/orders/{order}/pay", 400, BAD,
         _j({"amount_cents": 0}), auth="owner"),
    Case("pay-json-array", "POST", "/api/v1/orders/{order}/pay", 400, BAD, b"[]",
         auth="owner"),
    Case("pay-malformed-json", "POST", "/api/v1/orders/{order}/pay", 400, BAD, b"{",
         auth="owner"),
    # -- gateway webhook (signed, no bearer) --------------------------------------------
    Case("webhook-no-signature", "POST", "/api/v1/payments/webhook", 400, "invalid_signature",
         _j({"event_id": "e1", "type": "payment.succeeded", "payment_id": "pay_x",
             "order_id": "o", "amount_cents": 1}), auth=None),
    Case("webhook-garbled-signature", "POST", "/api/v1/payments/webhook", 400,
         "invalid_signature", b"{}", auth=None, headers={"Flashsale-Signature": "t=x,v1=zz"}),
    Case("webhook-wrong-signature", "POST", "/api/v1/payments/webhook", 400,
         "invalid_signature", b"{}", auth=None,
         headers={"Flashsale-Signature": f"t={NOW},v1={'0' * 64}"}),
    Case("webhook-stale-signature", "POST", "/api/v1/payments/webhook", 400,
         "invalid_signature", b"{}", auth=None,
         headers={"Flashsale-Signature": f"t={NOW - 301},v1={'0' * 64}"}),
    Case("webhook-body-over-16k", "POST", "/api/v1/payments/webhook", 400, BAD,
         b"{" + b" " * (17 * 1024) + b"}", auth=None),
    # -- mock gateway settle (admin) --------------------------------------------------------
    Case("settle-buyer-token", "POST", "/api/v1/admin/gateway/payments/pay_x/settle", 401,
         UNAUTH, _j({"outcome": "succeeded"})),
    Case("settle-unknown-payment", "POST",
         f"/api/v1/admin/gateway/payments/pay_{'0' * 24}/settle", 404, "payment_not_found",
         _j({"outcome": "succeeded"}), auth="admin"),
    Case("settle-bad-outcome", "POST", f"/api/v1/admin/gateway/payments/pay_{'0' * 24}/settle",
         400, BAD, _j({"outcome": "maybe"}), auth="admin"),
    # -- routing ------------------------------------------------------------------------
    Case("route-unknown", "GET", "/api/v1/nope", 404, "not_found", auth=None),
    Case("route-unknown-version", "GET", "/api/v2/sales/{sale}", 404, "not_found", auth=None),
    Case("route-trailing-slash", "GET", "/api/v1/sales/{sale}/", 404, "not_found", auth=None),
    Case("route-unknown-post", "POST", "/api/v1/orders", 404, "not_found", _j({"quantity": 1})),
    Case("method-delete-sale", "DELETE", "/api/v1/sales/{sale}", 405, "method_not_allowed",
         auth="admin"),
    Case("method-put-orders", "PUT", ORDERS, 405, "method_not_allowed", _j({"quantity": 1})),
    Case("method-get-orders", "GET", ORDERS, 405, "method_not_allowed"),
    Case("method-get-cancel", "GET", "/api/v1/orders/{order}/cancel", 405,
         "method_not_allowed"),
    Case("method-post-healthz", "POST", "/healthz", 405, "method_not_allowed", b"{}",
         auth=None),
]


@dataclass
class Table:
    api: Api
    sale_id: str
    order_id: str
    owner: str


async def _state(t: Table) -> dict[str, Any]:
    """Everything a bad input must leave untouched."""
    b = t.api.backends
    status, sale, _ = await t.api.request("GET", f"/api/v1/sales/{t.sale_id}")
    assert status == 200, sale
    counts = {}
    tables = await b.pg.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
    )
    for r in tables:  # every table of every migration
        counts[r["tablename"]] = await b.pg.fetchval(f'SELECT count(*) FROM "{r["tablename"]}"')
    k = b.keys(t.sale_id)
    return {
        "sale": sale,
        "ledger": await t.api.ledger(t.sale_id),
        "counts": counts,
        "stream": await b.redis.xlen(k.stream),
        "redis_sale": await b.redis.hgetall(k.sale),
        "users": await b.redis.hgetall(k.users),
    }


@pytest.fixture(scope="module")
async def table(server_urls: tuple[str, str], database_url: str) -> AsyncIterator[Table]:
    settings = support.test_settings(server_urls[0], database_url)
    async with running_app(settings) as api:
        sale = await api.create_sale(stock=10, per_user_limit=10, price_cents=500)
        status, order = await api.reserve(sale["sale_id"], "owner", 1, key="owner-1")
        assert status == 202, order
        yield Table(api, sale["sale_id"], order["order_id"], "owner")


@pytest.fixture(scope="module")
async def before(table: Table) -> dict[str, Any]:
    return await _state(table)


def _headers(t: Table, case: Case) -> dict[str, str]:
    headers = dict(case.headers)
    auth: str | None
    if case.auth == "buyer":
        auth = _bearer(t.api.token("mallory"))
    elif case.auth == "owner":
        auth = _bearer(t.api.token(t.owner))
    elif case.auth == "other-buyer":
        auth = _bearer(t.api.token("not-" + t.owner))
    elif case.auth == "admin":
        auth = t.api.admin["Authorization"]
    elif case.auth is None:
        auth = None
    else:
        auth = BAD_AUTH[case.auth]
    if auth is not None:
        headers["Authorization"] = auth
    if case.body is not None:
        headers.setdefault("Content-Type", "application/json")
    return headers


def assert_contract_error(status: int, body: Any, content_type: str | None) -> None:
    assert content_type is not None and content_type.startswith("application/json")
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == {"code", "message"}, body
    assert isinstance(err["code"], str) and err["code"]
    assert err["code"] == err["code"].lower() and " " not in err["code"]
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    assert 400 <= status < 500, (status, body)


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_bad_input(case: Case, table: Table, before: dict[str, Any]) -> None:
    path = case.path.format(sale=table.sale_id, order=table.order_id)
    status, body, resp = await table.api.request(
        case.method, path, data=case.body, headers=_headers(table, case)
    )
    assert (status, body["error"]["code"] if isinstance(body, dict) and "error" in body
            else body) == (case.status, case.code), body
    assert_contract_error(status, body, resp.headers.get("Content-Type"))
    if status == 405:
        assert resp.headers.get("Allow")
    assert await _state(table) == before, "a rejected request changed state"


async def test_stock_untouched_after_the_whole_table(
    table: Table, before: dict[str, Any]
) -> None:
    after = await _state(table)
    assert after == before
    assert after["sale"]["available"] == 9 and after["sale"]["stock"] == 10
    assert after["ledger"]["consistent"] is True
    assert after["ledger"]["pending"] == 1


async def test_empty_object_means_quantity_one(api: Api) -> None:
    sid = (await api.create_sale(stock=3, per_user_limit=3))["sale_id"]
    status, order = await api.reserve(sid, "erin", None, key="empty-object")
    assert status == 202, order
    assert order["quantity"] == 1 and order["status"] == "pending"
    status, sale, _ = await api.request("GET", f"/api/v1/sales/{sid}")
    assert sale["available"] == 2


async def test_a_valid_token_with_an_absurd_exp_is_not_a_500(table: Table) -> None:
    """PyJWT accepts exp = 10**400; the token cache must not overflow on it."""
    token = _signed_raw('{"sub":"mallory","exp":1' + "0" * 400 + "}")
    for _ in range(2):
        status, body, resp = await table.api.request(
            "GET", f"/api/v1/orders/{table.order_id}", headers={"Authorization": _bearer(token)}
        )
        assert (status, body["error"]["code"]) == (404, "order_not_found")
        assert_contract_error(status, body, resp.headers.get("Content-Type"))


async def test_chunked_body_over_16k_without_content_length(table: Table) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"quantity": 1, "pad": "'
        for _ in range(20):
            yield b"x" * 1024
        yield b'"}'

    url = f"{table.api.base}/api/v1/sales/{table.sale_id}/orders"
    headers = {**table.api.buyer("mallory"), "Content-Type": "application/json"}
    async with table.api.session.post(url, data=chunks(), headers=headers) as resp:
        body = orjson.loads(await resp.read())
        assert (resp.status, body["error"]["code"]) == (400, "invalid_request")
        assert_contract_error(resp.status, body, resp.headers.get("Content-Type"))
    assert (await table.api.ledger(table.sale_id))["pending"] == 1


async def test_control_char_in_a_header_is_a_4xx_without_traceback(table: Table) -> None:
    """A raw control character in a header is malformed HTTP: aiohttp's parser
    answers it before the app sees a request (so in aiohttp's own text/plain
    shape, which no middleware can reach). It must still be a 400 with no
    traceback, and reserve nothing."""
    host, port = table.api.base.removeprefix("http://").rsplit(":", 1)
    body = b'{"quantity": 1}'
    head = (
        f"POST /api/v1/sales/{table.sale_id}/orders HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {table.api.token('mallory')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\nIdempotency-Key: a"
    ).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"\x01b\r\n\r\n" + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    assert status_line.split()[1] == b"400", raw
    assert b"Traceback" not in rest
    assert (await table.api.ledger(table.sale_id))["pending"] == 1
