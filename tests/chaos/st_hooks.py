"""Schemathesis hooks and checks for the flashsale API (``SCHEMATHESIS_HOOKS``).

Loaded by the ``schemathesis`` CLI that tests/chaos/test_schemathesis.py runs
against a live app. What JSON Schema cannot say about this API, taught to the
generator (positive cases only; negative cases go out exactly as generated):

(Integers need no help: JSON Schema counts ``2.0`` as an integer, Schemathesis
sends such spellings on purpose, and flashsale accepts them as that integer,
tests/integration/test_shapes.py::test_integer_rule_is_the_published_one.)

* **A sale's window**: ``ends_at`` after ``starts_at``, years 2000–9000 (the
  spec's field descriptions): positive ``createSale`` bodies are moved inside.
* **Webhooks are signed.** ``Flashsale-Signature`` is an HMAC of the raw body
  with the app's secret (tests.support.WEBHOOK_SECRET). A well-formed
  generated header is replaced by a real signature (``t`` = now) of the exact
  bytes sent, so the body's own validation is what gets exercised; a
  malformed or missing header (negative cases, the missing-header check) is
  sent as generated.
* **Idempotency keys are per buyer, across sales** (a key reused on another
  sale is 422). Hypothesis draws few distinct keys ("0", "00", …), so almost
  every order after the first would be a 422 and stateful testing would never
  get past ``createOrder``; a positive key gets the sale id appended. A
  replay on the same sale with the same body still replays.

And one check of our own, ``cross_identity_isolation`` (the authorization
checks beside Schemathesis's ``ignored_auth``):

* every order a buyer sees (2xx with an ``order_id``) is then read, cancelled
  and paid as another buyer (``FLASHSALE_ST_INTRUDER_TOKEN``): each must be
  404 ``order_not_found``, exactly as for an unknown id;
* every 2xx admin request is replayed with a buyer's token: it must be 401.

(With the rate limits as shipped an intruder's probe may get 429 ``rate_limited``:
the limit is checked before the order is looked up, so it reveals nothing; such
probes are counted apart, as ``intruder_rate_limited``.)

Each probe is counted in ``FLASHSALE_ST_STATS`` (a JSON file) for the figures.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
import schemathesis

from flashsale.commerce.signature import SIGNATURE_HEADER, signature
from flashsale.schemas.bounds import SIGNATURE_PATTERN
from tests.support import WEBHOOK_SECRET

_SIGNATURE_RE = re.compile(SIGNATURE_PATTERN)
_KEY_MAX = 128
CREATE_SALE = "POST /api/v1/sales"
CREATE_ORDER = "POST /api/v1/sales/{sale_id}/orders"
WEBHOOK = "POST /api/v1/payments/webhook"
ORDER_OPERATIONS = frozenset({
    CREATE_ORDER, "GET /api/v1/orders/{order_id}", "POST /api/v1/orders/{order_id}/cancel",
    "POST /api/v1/orders/{order_id}/pay",
})
ADMIN_OPERATIONS = frozenset({
    CREATE_SALE, "POST /api/v1/sales/{sale_id}/restock",
    "GET /api/v1/admin/sales/{sale_id}/ledger",
    "POST /api/v1/admin/gateway/payments/{payment_id}/settle",
})
PROBE_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------- generation


def _parse_ts(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _within_years(dt: datetime) -> datetime:
    if dt.year < 2000:
        return dt.replace(year=2000)
    if dt.year > 8999:
        return dt.replace(year=8999)
    return dt


def _sale_window(body: dict[str, Any]) -> dict[str, Any]:
    """Move a well-formed (starts_at, ends_at) pair inside the sale's rules."""
    out = dict(body)
    starts = _parse_ts(out.get("starts_at"))
    if starts is not None:
        starts = _within_years(starts)
        out["starts_at"] = starts.isoformat()
    ends = _parse_ts(out.get("ends_at"))
    if ends is not None:
        ends = _within_years(ends)
        floor = starts or datetime.now(UTC)
        if ends <= floor:
            ends = floor + timedelta(days=1)
        out["ends_at"] = ends.isoformat()
    return out


def _is_positive(case: Any) -> bool:
    meta = getattr(case, "meta", None)
    return meta is None or bool(meta.generation.mode.is_positive)


def _header(headers: dict[str, Any], wanted: str) -> str | None:
    return next((h for h in headers if h.lower() == wanted.lower()), None)


def _key_per_sale(case: Any) -> None:
    headers: dict[str, Any] = case.headers if case.headers is not None else {}
    name = _header(headers, "Idempotency-Key")
    sale_id = str((case.path_parameters or {}).get("sale_id", ""))
    if name is None or not sale_id:
        return
    suffix = "@" + sale_id
    headers[name] = str(headers[name])[: _KEY_MAX - len(suffix)] + suffix


def _sign_webhook(case: Any) -> None:
    headers: dict[str, Any] = case.headers if case.headers is not None else {}
    name = _header(headers, SIGNATURE_HEADER)
    if name is None or not _SIGNATURE_RE.fullmatch(str(headers[name])):
        return  # a negative or missing header: sent as generated
    body = case.body
    if isinstance(body, bytes):
        raw = body
    elif body is None:
        raw = b"null"  # what Schemathesis sends for a None body
    else:
        try:  # exactly what requests sends for json=body (stdlib json)
            raw = json.dumps(body, allow_nan=False).encode()
        except (TypeError, ValueError):
            return
    headers[name] = signature(WEBHOOK_SECRET, int(time.time()), raw)


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: Any, kwargs: dict[str, Any]) -> None:
    label = case.operation.label
    if _is_positive(case):
        if isinstance(case.body, dict) and label == CREATE_SALE:
            case.body = _sale_window(case.body)
        if label == CREATE_ORDER:
            _key_per_sale(case)
    if label == WEBHOOK:
        _sign_webhook(case)


# --------------------------------------------------------------------------- our check


class _Stats:
    """Probe counters, saved to FLASHSALE_ST_STATS after each change (workers are threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.orders_seen: set[str] = set()
        self.admin_seen: set[str] = set()

    def bump(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + n
            path = os.environ.get("FLASHSALE_ST_STATS")
            if path:
                tmp = Path(path).with_suffix(".tmp")
                tmp.write_text(json.dumps(self.counts, sort_keys=True))
                tmp.replace(path)

    def first(self, seen: set[str], key: str) -> bool:
        with self._lock:
            if key in seen:
                return False
            seen.add(key)
            return True


STATS = _Stats()


def _base(response: Any) -> str:
    url = str(response.request.url)
    return url[: url.index("/", url.index("//") + 2)]


def _intruder_probes(base: str, order_id: str) -> None:
    token = os.environ["FLASHSALE_ST_INTRUDER_TOKEN"]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    for method, path in (
        ("GET", f"/api/v1/orders/{order_id}"),
        ("POST", f"/api/v1/orders/{order_id}/cancel"),
        ("POST", f"/api/v1/orders/{order_id}/pay"),
    ):
        r = requests.request(method, base + path, headers=headers, timeout=PROBE_TIMEOUT_S)
        STATS.bump("intruder_probes")
        code = _error_code(r)
        if r.status_code == 429 and code == "rate_limited":
            # the intruder's own bucket ran dry (rate limits as shipped): the limit is
            # checked before any order is looked up, so this tells nothing of the order
            STATS.bump("intruder_rate_limited")
            continue
        if r.status_code != 404 or code != "order_not_found":
            raise AssertionError(
                f"another buyer's {method} {path} answered {r.status_code} {code!r} "
                f"(expected 404 order_not_found, as for an unknown id): {r.text[:300]}"
            )


def _error_code(r: requests.Response) -> str | None:
    try:
        body = r.json()
    except ValueError:
        return None
    err = body.get("error") if isinstance(body, dict) else None
    return str(err.get("code")) if isinstance(err, dict) else None


def _buyer_on_admin(response: Any) -> None:
    token = os.environ["FLASHSALE_ST_BUYER_TOKEN"]
    req = response.request
    headers = {k: v for k, v in req.headers.items() if k.lower() != "authorization"}
    headers["Authorization"] = f"Bearer {token}"
    r = requests.request(req.method, req.url, data=req.body, headers=headers,
                         timeout=PROBE_TIMEOUT_S)
    STATS.bump("buyer_on_admin_probes")
    if r.status_code != 401 or _error_code(r) != "unauthorized":
        raise AssertionError(
            f"{req.method} {req.url} with a buyer's token answered {r.status_code} "
            f"(expected 401 unauthorized): {r.text[:300]}"
        )


@schemathesis.check
def cross_identity_isolation(ctx: Any, response: Any, case: Any) -> bool | None:
    """Buyers never reach other buyers' orders; buyers never pass admin endpoints."""
    if not 200 <= response.status_code < 300:
        return None
    label = case.operation.label
    if label in ORDER_OPERATIONS:
        try:
            order_id = response.json().get("order_id")
        except (ValueError, AttributeError):
            return None
        if isinstance(order_id, str) and STATS.first(STATS.orders_seen, order_id):
            _intruder_probes(_base(response), order_id)
    elif label in ADMIN_OPERATIONS and STATS.first(
        STATS.admin_seen, f"{label} {response.request.url}"
    ):  # one probe per operation and path: enough to show the token is refused there
        _buyer_on_admin(response)
    return None
