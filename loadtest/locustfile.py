"""Locust: viral buyers on one hot sale, and a spike-shaped load.

A ViralBuyer is one buyer at a time: it looks at the sale, reserves with an
Idempotency-Key (retrying the same key after a 429/503, as the contract
allows), polls its order until the consumer persisted it, pays, and settles
the payment through the mock gateway's admin endpoint (tolerating 404 where
an endpoint does not exist), then polls until paid/shipped. Then it becomes a
new buyer (a new identity), so the number of users stays what the shape asks.
A buyer that finds the sale sold out looks a couple more times and leaves.

Environment:
  FLASHSALE_JWT_SECRET   mints the buyers' tokens (required)
  FLASHSALE_ADMIN_TOKEN  for the settle endpoint, and to create a sale when
                         LOADTEST_SALE_ID is not given
  LOADTEST_SALE_ID       the hot sale (else one is created at test start)
  LOADTEST_STOCK         its stock when created here (default 2000)
  LOADTEST_SHAPE         "spike" (default) or "off" (choose users in the web UI)
  LOADTEST_PEAK_USERS, LOADTEST_RAMP_S, LOADTEST_PLATEAU_S, LOADTEST_DECAY_S
                         the spike: 0 -> peak in RAMP, PLATEAU at peak, down in DECAY
                         (defaults 150 users, 5 s, 30 s, 15 s)
  LOADTEST_SUMMARY       a JSON file written at the end with the buyers' own counts
  LOADTEST_ROOM          "1": RoomBuyer (a sale with a waiting room) may run too; choose
                         it by name: locust -f loadtest/locustfile.py RoomBuyer
  LOADTEST_ROOM_SALE_ID  RoomBuyer's sale (else one with a room is created)
  LOADTEST_ROOM_ADMIT_PER_S  that room's admission rate (default 50)
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections import Counter
from typing import Any

import requests
from locust import HttpUser, LoadTestShape, between, events, task
from locust.env import Environment

from flashsale import auth

POLL_TRIES = 20
POLL_SLEEP_S = 0.25
SOLD_OUT_LOOKS = 2
SHED_RETRIES = 3

_counts: Counter[str] = Counter()
_lock = threading.Lock()
_state: dict[str, str] = {}


def count(name: str, n: int = 1) -> None:
    with _lock:
        _counts[name] += n


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def _error_code(resp: Any) -> str:
    try:
        body = resp.json()
    except ValueError:
        return ""
    err = body.get("error") if isinstance(body, dict) else None
    return str(err.get("code", "")) if isinstance(err, dict) else ""


def _create_sale(environment: Environment, **_kw: Any) -> None:
    """Use LOADTEST_SALE_ID, or create a sale through the admin API."""
    sale_id = os.environ.get("LOADTEST_SALE_ID")
    if not sale_id:
        host = (environment.host or "").rstrip("/")
        admin = os.environ["FLASHSALE_ADMIN_TOKEN"]
        body: dict[str, str | int] = {
            "sku": "LOCUST-1", "name": "locust spike", "price_cents": 2500,
            "stock": int(os.environ.get("LOADTEST_STOCK", "2000")), "per_user_limit": 1,
        }
        resp = requests.post(f"{host}/api/v1/sales", json=body, timeout=10,
                             headers={"Authorization": f"Bearer {admin}"})
        resp.raise_for_status()
        sale_id = str(resp.json()["sale_id"])
    _state["sale_id"] = sale_id


def _write_summary(**_kw: Any) -> None:
    path = os.environ.get("LOADTEST_SUMMARY")
    if path:
        with _lock:
            doc = {"sale_id": _state.get("sale_id"), "room_sale_id": _state.get("room_sale_id"),
                   "counts": dict(_counts)}
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=2)


# EventHook.add_listener has no annotations in locust 2.x
events.test_start.add_listener(_create_sale)  # type: ignore[no-untyped-call]
events.test_stop.add_listener(_write_summary)  # type: ignore[no-untyped-call]


class ViralBuyer(HttpUser):
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        self._secret = os.environ["FLASHSALE_JWT_SECRET"]
        self._admin = os.environ.get("FLASHSALE_ADMIN_TOKEN", "")
        self._new_identity()

    def _new_identity(self) -> None:
        self.user_id = "lt-" + secrets.token_hex(6)
        token = auth.mint(self._secret, self.user_id, 3600)
        self.headers = {"Authorization": f"Bearer {token}"}
        self.looks_sold_out = 0

    @property
    def sale_id(self) -> str:
        return _state["sale_id"]

    @task
    def buy(self) -> None:
        with self.client.get(f"/api/v1/sales/{self.sale_id}", headers=self.headers,
                             name="GET /api/v1/sales/[sale]", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"sale: HTTP {resp.status_code}")
                return
            sale = resp.json()
        if sale.get("status") == "sold_out" or sale.get("available") == 0:
            self._sold_out()
            return
        order = self._reserve()
        if order is None:
            return
        persisted = self._poll(order, {"awaiting_payment", "paid", "shipped"})
        if persisted is not None and persisted["status"] == "awaiting_payment":
            self._pay_and_settle(order)
        self._new_identity()

    def _sold_out(self) -> None:
        self.looks_sold_out += 1
        if self.looks_sold_out > SOLD_OUT_LOOKS:
            count("buyers_left_sold_out")
            self._new_identity()

    def _reserve(self) -> dict[str, Any] | None:
        """POST the order; the same key on a 429/503 retry. Returns the order or None."""
        key = "lt-" + secrets.token_hex(8)
        headers = {**self.headers, "Idempotency-Key": key}
        for _attempt in range(SHED_RETRIES + 1):
            with self.client.post(
                f"/api/v1/sales/{self.sale_id}/orders", json={"quantity": 1}, headers=headers,
                name="POST /api/v1/sales/[sale]/orders", catch_response=True,
            ) as resp:
                code = _error_code(resp)
                if resp.status_code == 202:
                    count("accepted")
                    return dict(resp.json())
                if resp.status_code == 409 and code in ("sold_out", "limit_exceeded",
                                                        "sale_not_active"):
                    resp.success()
                    count(code)
                    if code == "sold_out":
                        self._sold_out()
                    return None
                if resp.status_code in (429, 503):
                    resp.failure(f"shed: {resp.status_code} {code}")  # visible, not fatal
                    count(f"shed_{resp.status_code}")
                    time.sleep(float(resp.headers.get("Retry-After", "1")))
                    continue
                resp.failure(f"reserve: HTTP {resp.status_code} {code}")
                count("reserve_unexpected")
                return None
        return None

    def _poll(self, order: dict[str, Any], until: set[str]) -> dict[str, Any] | None:
        for _ in range(POLL_TRIES):
            with self.client.get(f"/api/v1/orders/{order['order_id']}", headers=self.headers,
                                 name="GET /api/v1/orders/[order]", catch_response=True) as resp:
                if resp.status_code != 200:
                    resp.failure(f"order: HTTP {resp.status_code}")
                    return None
                seen = dict(resp.json())
            if seen.get("status") in until:
                return seen
            time.sleep(POLL_SLEEP_S)
        count("poll_gave_up")
        return None

    def _pay_and_settle(self, order: dict[str, Any]) -> None:
        with self.client.post(f"/api/v1/orders/{order['order_id']}/pay", headers=self.headers,
                              name="POST /api/v1/orders/[order]/pay",
                              catch_response=True) as resp:
            if resp.status_code == 404 and _error_code(resp) == "not_found":
                resp.success()  # the endpoint is not there (yet)
                count("pay_endpoint_missing")
                return
            if resp.status_code != 201:
                resp.failure(f"pay: HTTP {resp.status_code} {_error_code(resp)}")
                return
            payment_id = str(resp.json()["payment_id"])
            count("payments")
        if not self._admin:
            return
        with self.client.post(
            f"/api/v1/admin/gateway/payments/{payment_id}/settle", json={"outcome": "succeeded"},
            headers={"Authorization": f"Bearer {self._admin}"},
            name="POST /api/v1/admin/gateway/payments/[payment]/settle", catch_response=True,
        ) as resp:
            if resp.status_code == 404:
                resp.success()  # the mock gateway's endpoint is not there (yet)
                count("settle_endpoint_missing")
                return
            if resp.status_code != 200:
                resp.failure(f"settle: HTTP {resp.status_code} {_error_code(resp)}")
                return
            count("settled")
        if self._poll(order, {"paid", "shipped"}) is not None:
            count("paid")


ROOM_POLLS_MAX = 600  # a RoomBuyer gives up after this many polls


def _room_sale(host: str) -> str:
    """LOADTEST_ROOM_SALE_ID, or a sale with a waiting room made once here."""
    with _lock:
        if "room_sale_id" in _state:
            return _state["room_sale_id"]
        sale_id = os.environ.get("LOADTEST_ROOM_SALE_ID")
        if not sale_id:
            admin = os.environ["FLASHSALE_ADMIN_TOKEN"]
            body: dict[str, Any] = {
                "sku": "LOCUST-ROOM", "name": "locust room", "price_cents": 2500,
                "stock": int(os.environ.get("LOADTEST_STOCK", "2000")), "per_user_limit": 1,
                "waiting_room": {
                    "admit_per_s": int(_env_float("LOADTEST_ROOM_ADMIT_PER_S", 50)),
                    "pass_seconds": 120,
                },
            }
            resp = requests.post(f"{host.rstrip('/')}/api/v1/sales", json=body, timeout=10,
                                 headers={"Authorization": f"Bearer {admin}"})
            resp.raise_for_status()
            sale_id = str(resp.json()["sale_id"])
        _state["room_sale_id"] = sale_id
        return sale_id


class RoomBuyer(HttpUser):
    """A buyer of a sale with a waiting room (issue 12): joins the queue, polls
    its ticket at the ``poll_after_ms`` the server asks for (the heartbeat),
    and once admitted reserves with the pass (header Flashsale-Pass, the ticket
    id as Idempotency-Key). Then a new identity. Not run unless chosen:
    ``LOADTEST_ROOM=1 locust -f loadtest/locustfile.py RoomBuyer`` (the sale is
    LOADTEST_ROOM_SALE_ID, or one with a room made at LOADTEST_ROOM_ADMIT_PER_S,
    default 50/s)."""

    abstract = os.environ.get("LOADTEST_ROOM", "") != "1"  # the spike runs ViralBuyer only
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        self._secret = os.environ["FLASHSALE_JWT_SECRET"]
        self.sale_id = _room_sale(self.host or "")
        self._new_identity()

    def _new_identity(self) -> None:
        self.user_id = "lr-" + secrets.token_hex(6)
        token = auth.mint(self._secret, self.user_id, 3600)
        self.headers = {"Authorization": f"Bearer {token}"}

    @task
    def wait_and_buy(self) -> None:
        base = f"/api/v1/sales/{self.sale_id}/queue"
        with self.client.post(base, headers=self.headers, name="POST /api/v1/sales/[sale]/queue",
                              catch_response=True) as resp:
            if resp.status_code == 409 and _error_code(resp) == "sold_out":
                resp.success()
                count("room_sold_out_at_join")
                self._new_identity()
                return
            if resp.status_code not in (200, 201):
                resp.failure(f"join: HTTP {resp.status_code} {_error_code(resp)}")
                time.sleep(float(resp.headers.get("Retry-After", "1")))
                return
            ticket = dict(resp.json())
        count("room_joined")
        for _ in range(ROOM_POLLS_MAX):
            state = ticket["state"]
            if state == "admitted":
                self._reserve(ticket)
                break
            if state != "waiting":
                count(f"room_{state}")
                break
            time.sleep(ticket["poll_after_ms"] / 1000)
            with self.client.get(f"{base}/{ticket['ticket_id']}", headers=self.headers,
                                 name="GET /api/v1/sales/[sale]/queue/[ticket]",
                                 catch_response=True) as resp:
                if resp.status_code != 200:
                    resp.failure(f"poll: HTTP {resp.status_code} {_error_code(resp)}")
                    time.sleep(1.0)
                    continue
                ticket = dict(resp.json())
        self._new_identity()

    def _reserve(self, ticket: dict[str, Any]) -> None:
        headers = {**self.headers, "Flashsale-Pass": ticket["pass"],
                   "Idempotency-Key": ticket["ticket_id"]}
        with self.client.post(f"/api/v1/sales/{self.sale_id}/orders", json={"quantity": 1},
                              headers=headers, name="POST /api/v1/sales/[sale]/orders (pass)",
                              catch_response=True) as resp:
            if resp.status_code == 202:
                count("room_accepted")
            elif resp.status_code == 409:
                resp.success()
                count(f"room_{_error_code(resp)}")
            else:
                resp.failure(f"reserve with pass: HTTP {resp.status_code} {_error_code(resp)}")


if os.environ.get("LOADTEST_SHAPE", "spike") == "spike":

    class SpikeShape(LoadTestShape):
        """Zero to peak in seconds, a plateau, a linear decay, then stop."""

        peak = int(_env_float("LOADTEST_PEAK_USERS", 150))
        ramp_s = _env_float("LOADTEST_RAMP_S", 5)
        plateau_s = _env_float("LOADTEST_PLATEAU_S", 30)
        decay_s = _env_float("LOADTEST_DECAY_S", 15)

        def tick(self) -> tuple[int, float] | None:
            t = time.perf_counter() - self.start_time  # as get_run_time() (untyped)
            fast = max(1.0, self.peak / max(0.1, self.ramp_s))
            if t < self.ramp_s + self.plateau_s:
                return self.peak, fast
            into = t - self.ramp_s - self.plateau_s
            if into < self.decay_s:
                left = self.peak * (1 - into / max(0.1, self.decay_s))
                return max(1, round(left)), max(1.0, self.peak / max(0.1, self.decay_s))
            return None
