"""The outside services of the commerce flow, each behind its circuit breaker.

One ``Integrations`` per process, owned by the app (or a CLI loop) and closed
by it; never a module global. The payment gateway and the carrier are the
in-process mocks (``gateway.MockGateway``, ``logistics.MockCarrier``).
"""

from __future__ import annotations

from dataclasses import dataclass

from flashsale.commerce.breaker import CircuitBreaker
from flashsale.commerce.gateway import MockGateway
from flashsale.commerce.logistics import MockCarrier
from flashsale.config import Settings


@dataclass(frozen=True, slots=True)
class Integrations:
    gateway: MockGateway
    carrier: MockCarrier
    gateway_breaker: CircuitBreaker
    carrier_breaker: CircuitBreaker

    @classmethod
    def from_settings(
        cls, s: Settings, *, gateway: MockGateway | None = None,
        carrier: MockCarrier | None = None,
    ) -> Integrations:
        return cls(
            gateway=gateway or MockGateway(
                s.webhook_secret, timeout_s=s.gateway_timeout_s,
                webhook_attempts=s.gateway_webhook_attempts,
            ),
            carrier=carrier or MockCarrier(),
            gateway_breaker=CircuitBreaker(
                "gateway", failure_threshold=s.breaker_failure_threshold,
                open_s=s.breaker_open_s, call_timeout_s=s.gateway_timeout_s,
            ),
            carrier_breaker=CircuitBreaker(
                "carrier", failure_threshold=s.breaker_failure_threshold,
                open_s=s.breaker_open_s, call_timeout_s=s.carrier_timeout_s,
            ),
        )

    async def close(self) -> None:
        await self.gateway.close()
