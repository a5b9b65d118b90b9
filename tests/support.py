"""Test support: a running flashsale app on real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
from aiohttp import ClientResponse, ClientSession

from flashsale import auth
from flashsale.config import Settings
from flashsale.core import migrate
from flashsale.core.backends import Backends
from flashsale.core.compensate import Compensator
from flashsale.core.outcomes import Accepted
from flashsale.core.persist import Persister
from flashsale.core.reserve import Reserver
from flashsale.ops.metrics import Metrics
from flashsale.run import roles
from flashsale.web import front
from flashsale.web.app import Workers, create_app
from flashsale.web.keys import BACKENDS

ADMIN_TOKEN = "test-admin-token-0123456789"
JWT_SECRET = "test-jwt-secret-0123456789-abcdefghijkl"
WEBHOOK_SECRET = "test-webhook-secret-0123456789"


def test_settings(redis_url: str, database_url: str, **overrides: Any) -> Settings:
    base = Settings(
        redis_url=redis_url,
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        jwt_secret=JWT_SECRET,
        webhook_secret=WEBHOOK_SECRET,
        key_prefix="t" + secrets.token_hex(6),
        consumer_claim_idle_ms=1000,
        consumer_block_ms=50,
        pg_pool_max=20,
        rate_user_per_s=0.0,  # tests fire many requests per buyer; test_admission enables it
        rate_limited_delay_s=0.0,  # 429s at once (the tarpit is measured in tests/chaos)
    )
    return replace(base, **overrides)


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@dataclass
class Api:
    """A thin client for the contract's endpoints, bound to one running app."""

    session: ClientSession
    base: str
    settings: Settings
    backends: Backends

    def token(self, user_id: str, ttl_s: int = 3600) -> str:
        return auth.mint(self.settings.jwt_secret, user_id, ttl_s)

    def buyer(self, user_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user_id)}"}

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_token}"}

    async def request(
        self, method: str, path: str, *, json: Any = None, data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, ClientResponse]:
        body = data if data is not None else (orjson.dumps(json) if json is not None else None)
        hdrs = dict(headers or {})
        if body is not None:
            hdrs.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.base + path, data=body, headers=hdrs) as r:
            raw = await r.read()
            try:
                parsed = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                parsed = raw.decode(errors="replace")
            return r.status, parsed, r

    async def create_sale(self, **fields: Any) -> dict[str, Any]:
        body = {"sku": "SKU-1", "name": "Test sale", "price_cents": 1999, "stock": 10, **fields}
        status, sale, _ = await self.request("POST", "/api/v1/sales", json=body, headers=self.admin)
        assert status == 201, sale
        assert isinstance(sale, dict)
        return sale

    async def reserve(
        self, sale_id: str, user_id: str, quantity: int | None = 1, key: str | None = None
    ) -> tuple[int, Any]:
        headers = self.buyer(user_id)
        if key is not None:
            headers["Idempotency-Key"] = key
        body = {} if quantity is None else {"quantity": quantity}
        status, parsed, _ = await self.request(
            "POST", f"/api/v1/sales/{sale_id}/orders", json=body, headers=headers
        )
        return status, parsed

    async def ledger(self, sale_id: str) -> dict[str, Any]:
        status, body, _ = await self.request(
            "GET", f"/api/v1/admin/sales/{sale_id}/ledger", headers=self.admin
        )
        assert status == 200, body
        assert isinstance(body, dict)
        return body

    async def drain(self, sale_id: str, timeout_s: float = 30.0) -> None:
        """Run a consumer until the sale's stream is empty (every entry acked)."""
        persister = Persister(self.backends, Metrics(), name="drain-" + secrets.token_hex(3))
        k = self.backends.keys(sale_id)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await persister.step()
            if await self.backends.redis.xlen(k.stream) == 0:
                return
        raise AssertionError(f"stream of {sale_id} not drained in {timeout_s}s")

    async def compensate(self) -> int:
        return await Compensator(self.backends, Metrics()).step()


def with_database(dsn: str, name: str) -> str:
    """The same DSN, naming another database."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


@asynccontextmanager
async def fresh_database(
    admin_dsn: str, prefix: str = "flashsale_test", *, migrated: bool = True
) -> AsyncIterator[str]:
    """A new database (migrated unless told otherwise) created through the admin
    DSN, dropped afterwards; yields its DSN."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = with_database(admin_dsn, name)
    try:
        if migrated:
            conn = await asyncpg.connect(dsn)
            try:
                await migrate.migrate(conn)
            finally:
                await conn.close()
        yield dsn
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@asynccontextmanager
async def running_app(settings: Settings, workers: Workers | None = None) -> AsyncIterator[Api]:
    """The app served as `flashsale serve` serves it (flashsale.web.front), on a free port."""
    app = create_app(settings, workers, roles.loops)
    runner = await front.start(app, settings, "127.0.0.1", 0)
    try:
        async with ClientSession() as session:
            base = f"http://127.0.0.1:{front.bound_port(runner)}"
            yield Api(session, base, settings, app[BACKENDS])
    finally:
        await runner.cleanup()


async def eventually(check: Any, timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met in {timeout_s}s (last: {last!r})")


async def poison_order(backends: Backends, sale_id: str) -> Accepted:
    """A reservation Redis accepts and PostgreSQL refuses (its 65-character
    buyer id breaks a CHECK): the consumer can only dead-letter it."""
    reserver = Reserver(backends)
    try:
        poison = await reserver.reserve(sale_id, "p" * 65, 1, "poison")
    finally:
        await reserver.close()
    assert isinstance(poison, Accepted), poison
    return poison
