"""Test support for the commerce flow: an app whose integrations the test can
reach (mock gateway, carrier, breakers), signed webhooks, and the saga runner."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from aiohttp import ClientSession, web

from flashsale.commerce.integrations import Integrations
from flashsale.commerce.logistics import MockCarrier
from flashsale.commerce.saga import SagaRunner
from flashsale.commerce.signature import SIGNATURE_HEADER, signature
from flashsale.config import Settings
from flashsale.core import events
from flashsale.core.backends import Backends
from flashsale.web import front
from flashsale.web.app import create_app
from flashsale.web.keys import BACKENDS, INTEGRATIONS
from tests.support import WEBHOOK_SECRET, Api, test_settings

WEBHOOK = "/api/v1/payments/webhook"

# small backoffs and breaker windows keep the saga tests fast
FAST: dict[str, Any] = {
    "saga_backoff_base_s": 0.01,
    "saga_backoff_max_s": 0.05,
    "breaker_failure_threshold": 2,
    "breaker_open_s": 0.05,
    "carrier_attempts_max": 3,
    "refund_attempts_max": 3,
    "gateway_webhook_attempts": 1,
}


def shop_settings(redis_url: str, database_url: str, **overrides: Any) -> Settings:
    return test_settings(redis_url, database_url, **{**FAST, **overrides})


@dataclass
class Shop:
    api: Api
    app: web.Application

    @property
    def b(self) -> Backends:
        return self.api.backends

    @property
    def integrations(self) -> Integrations:
        return self.app[INTEGRATIONS]

    async def order(self, sale_id: str, user: str, qty: int = 1, *, persist: bool = True) -> str:
        status, body = await self.api.reserve(sale_id, user, qty, key=secrets.token_hex(8))
        assert status == 202, body
        if persist:
            await self.api.drain(sale_id)
        return str(body["order_id"])

    async def get(self, order_id: str, user: str) -> tuple[int, Any]:
        status, body, _ = await self.api.request(
            "GET", f"/api/v1/orders/{order_id}", headers=self.api.buyer(user)
        )
        return status, body

    async def status_of(self, order_id: str) -> str:
        return str(await self.b.pg.fetchval(
            "SELECT status FROM orders WHERE order_id = $1", order_id
        ))

    async def cancel(self, order_id: str, user: str) -> tuple[int, Any]:
        status, body, _ = await self.api.request(
            "POST", f"/api/v1/orders/{order_id}/cancel", headers=self.api.buyer(user)
        )
        return status, body

    async def pay(self, order_id: str, user: str, body: Any = None) -> tuple[int, Any]:
        status, parsed, _ = await self.api.request(
            "POST", f"/api/v1/orders/{order_id}/pay", json=body, headers=self.api.buyer(user)
        )
        return status, parsed

    async def paid_payment(self, order_id: str, user: str) -> dict[str, Any]:
        status, p = await self.pay(order_id, user)
        assert status == 201, p
        assert isinstance(p, dict)
        return p

    async def settle(self, payment_id: str, outcome: str = "succeeded") -> tuple[int, Any]:
        status, body, _ = await self.api.request(
            "POST", f"/api/v1/admin/gateway/payments/{payment_id}/settle",
            json={"outcome": outcome}, headers=self.api.admin,
        )
        return status, body

    @staticmethod
    def event(
        p: dict[str, Any], kind: str = "payment.succeeded", event_id: str | None = None,
        **override: Any,
    ) -> dict[str, Any]:
        return {"event_id": event_id or "evt_" + secrets.token_hex(8), "type": kind,
                "payment_id": p["payment_id"], "order_id": p["order_id"],
                "amount_cents": p["amount_cents"], **override}

    async def webhook(
        self, event: dict[str, Any] | None = None, *, raw: bytes | None = None,
        secret: str = WEBHOOK_SECRET, t: int | None = None, header: str | None = None,
        signed_raw: bytes | None = None, t_offset_s: int = 0,
    ) -> tuple[int, Any]:
        """POST the webhook. ``raw`` is sent; ``signed_raw`` (default ``raw``) is signed;
        ``header`` replaces the signature header entirely ("" sends none); ``t``
        defaults to the clock at sending plus ``t_offset_s``."""
        body = raw if raw is not None else orjson.dumps(event)
        to_sign = signed_raw if signed_raw is not None else body
        hdrs = {"Content-Type": "application/json"}
        value = header if header is not None else signature(
            secret, int(time.time()) + t_offset_s if t is None else t, to_sign
        )
        if value:
            hdrs[SIGNATURE_HEADER] = value
        status, parsed, _ = await self.api.request("POST", WEBHOOK, data=body, headers=hdrs)
        return status, parsed

    def saga(self, carrier: MockCarrier | None = None) -> SagaRunner:
        """A runner on this app's integrations, or on fresh ones with ``carrier``."""
        if carrier is None:
            return SagaRunner(self.b, self.integrations)
        return SagaRunner(self.b, Integrations.from_settings(self.api.settings, carrier=carrier))

    async def domain_events(self, order_id: str | None = None) -> list[dict[str, str]]:
        raw: Any = await self.b.redis.xrange(events.stream_key(self.api.settings.key_prefix))
        out = []
        for _eid, fields in raw:
            ev = {k.decode(): v.decode() for k, v in fields.items()}
            if order_id is None or ev["order_id"] == order_id:
                out.append(ev)
        return out

    async def count(self, sql: str, *args: Any) -> int:
        return int(await self.b.pg.fetchval(sql, *args))

    async def row(self, sql: str, *args: Any) -> asyncpg.Record:
        found = await self.b.pg.fetchrow(sql, *args)
        assert found is not None, (sql, args)
        return found

    async def value(self, sql: str, *args: Any) -> Any:
        return await self.b.pg.fetchval(sql, *args)


async def park_leftovers(b: Backends) -> None:
    """The database is shared by the run's tests: sagas and refunds earlier tests
    left due are pushed out of the way, so this test's runner sees its own only."""
    for table, status in (("order_sagas", "step = 'ship'"), ("refunds", "status = 'requested'")):
        await b.pg.execute(
            f"UPDATE {table} SET next_attempt_at = now() + interval '1 day' WHERE {status}"
        )


@asynccontextmanager
async def running_shop(settings: Settings) -> AsyncIterator[Shop]:
    """The HTTP front alone (no background loops), with its app at hand."""
    app = create_app(settings)
    runner = await front.start(app, settings, "127.0.0.1", 0)
    try:
        async with ClientSession() as session:
            base = f"http://127.0.0.1:{front.bound_port(runner)}"
            api = Api(session, base, settings, app[BACKENDS])
            await park_leftovers(api.backends)
            yield Shop(api, app)
    finally:
        await runner.cleanup()
