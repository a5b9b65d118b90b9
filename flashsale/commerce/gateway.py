"""A mock payment gateway, in-process, standing in for the provider.

Our calls to it (``create_payment``, ``refund``) are simulated provider calls
with configurable failure and latency; callers wrap them in a circuit
breaker. ``settle`` plays the provider's side: it sends our webhook endpoint
an event signed exactly as the contract says (``Flashsale-Signature``), and
retries a 5xx answer a bounded number of times, re-signing each attempt, as a
real gateway would. It exists for development and tests, behind an admin-only
endpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import ClientError, ClientSession, ClientTimeout

from flashsale.commerce.signature import SIGNATURE_HEADER, signature
from flashsale.core.statuses import SETTLE_OUTCOMES

WEBHOOK_BACKOFF_BASE_S = 0.2
WEBHOOK_BACKOFF_MAX_S = 2.0


class GatewayError(Exception):
    """The gateway refused or failed the call."""


@dataclass(frozen=True, slots=True)
class Settlement:
    payment_id: str
    event_id: str
    type: str
    webhook_status: int  # 0 when the webhook could not be delivered at all
    webhook_response: Any
    attempts: int

    def body(self) -> dict[str, Any]:
        return {"payment_id": self.payment_id, "event_id": self.event_id, "type": self.type,
                "webhook_status": self.webhook_status,
                "webhook_response": self.webhook_response, "attempts": self.attempts}


class MockGateway:
    """``down`` fails every call we make to it; ``latency_s`` delays each one."""

    def __init__(
        self, webhook_secret: str, *, timeout_s: float, webhook_attempts: int,
        down: bool = False, latency_s: float = 0.0,
    ) -> None:
        self._secret = webhook_secret
        self._timeout_s = timeout_s
        self._attempts = max(1, webhook_attempts)
        self.down = down
        self.latency_s = latency_s
        self.calls = 0
        self._session: ClientSession | None = None

    async def _provider_call(self) -> None:
        self.calls += 1
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        if self.down:
            raise GatewayError("payment gateway unavailable")

    async def create_payment(self, payment_id: str, amount_cents: int) -> None:
        """Register the payment with the provider (idempotent by payment id)."""
        await self._provider_call()

    async def refund(self, payment_id: str, amount_cents: int) -> str:
        """Give the money back; idempotent by payment id. Returns the refund's id."""
        await self._provider_call()
        return "gre_" + hashlib.sha256(f"refund:{payment_id}".encode()).hexdigest()[:24]

    async def settle(
        self, webhook_url: str, payment_id: str, order_id: str, amount_cents: int, outcome: str,
    ) -> Settlement:
        """Send the webhook for a settled payment; bounded retries on 5xx or no answer."""
        if outcome not in SETTLE_OUTCOMES:
            raise ValueError(f"outcome must be one of {SETTLE_OUTCOMES}")
        event = {"event_id": "evt_" + secrets.token_hex(12), "type": f"payment.{outcome}",
                 "payment_id": payment_id, "order_id": order_id, "amount_cents": amount_cents}
        raw = orjson.dumps(event)
        status, answer, attempt = 0, None, 0
        for attempt in range(1, self._attempts + 1):
            status, answer = await self._post(webhook_url, raw)
            if 0 < status < 500:
                break
            if attempt < self._attempts:
                await asyncio.sleep(
                    min(WEBHOOK_BACKOFF_MAX_S, WEBHOOK_BACKOFF_BASE_S * 2 ** (attempt - 1))
                )
        return Settlement(payment_id, str(event["event_id"]), str(event["type"]), status,
                          answer, attempt)

    async def _post(self, url: str, raw: bytes) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json",
                   SIGNATURE_HEADER: signature(self._secret, int(time.time()), raw)}
        try:
            async with self._client().post(url, data=raw, headers=headers) as resp:
                body = await resp.read()
                try:
                    return resp.status, orjson.loads(body) if body else None
                except orjson.JSONDecodeError:
                    return resp.status, body.decode(errors="replace")[:500]
        except (ClientError, TimeoutError, OSError) as exc:
            return 0, repr(exc)

    def _client(self) -> ClientSession:
        if self._session is None or self._session.closed:
            self._session = ClientSession(timeout=ClientTimeout(total=self._timeout_s))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
