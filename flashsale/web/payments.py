"""Payment endpoints: pay (buyer), the gateway webhook (signed), and the mock
gateway's settle endpoint (admin; development and tests)."""

from __future__ import annotations

import math
import time

from aiohttp import web

from flashsale import errors, validate
from flashsale.commerce import payment, signature
from flashsale.commerce.breaker import CircuitOpen
from flashsale.commerce.gateway import GatewayError
from flashsale.commerce.integrations import Integrations
from flashsale.schemas.bodies import GatewaySettle, NoBody
from flashsale.schemas.decode import BodyReader
from flashsale.web import front
from flashsale.web.keys import BACKENDS, INTEGRATIONS, SETTINGS
from flashsale.web.replies import json_response
from flashsale.web.routes import admin, buyer, read_body

WEBHOOK_PATH = "/api/v1/payments/webhook"
READ_PAY = BodyReader(NoBody, empty_ok=True)  # amount, status, user: all server-owned
READ_SETTLE = BodyReader(GatewaySettle)


async def pay_order(request: web.Request) -> web.Response:
    user_id = buyer(request)
    READ_PAY(await read_body(request))
    b, integ = request.app[BACKENDS], request.app[INTEGRATIONS]
    p = await payment.request_payment(b, request.match_info["order_id"], user_id)
    try:
        await integ.gateway_breaker.call(
            lambda: integ.gateway.create_payment(p.payment_id, p.amount_cents)
        )
    except CircuitOpen as exc:
        raise _gateway_unavailable(exc.retry_after_s) from None
    except (GatewayError, TimeoutError):
        raise _gateway_unavailable(1.0) from None
    return json_response(p.body(), 201)


def _gateway_unavailable(retry_after_s: float) -> errors.Unavailable:
    exc = errors.Unavailable("the payment gateway is unavailable; nothing was charged. Retry later")
    exc.retry_after_s = max(1, math.ceil(retry_after_s))
    return exc


async def payment_webhook(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    raw = await read_body(request)
    signature.verify(
        settings.webhook_secret, request.headers.get(signature.SIGNATURE_HEADER), raw,
        time.time(), settings.webhook_tolerance_s,
    )
    event = payment.Event.parse(raw)
    applied = await payment.process(request.app[BACKENDS], event)
    return json_response({"status": "ok", "event_id": event.event_id,
                          "outcome": applied.outcome})


async def settle_payment(request: web.Request) -> web.Response:
    admin(request)
    outcome = READ_SETTLE(await read_body(request)).outcome
    payment_id = request.match_info["payment_id"]
    found = None
    if validate.PAYMENT_ID_RE.fullmatch(payment_id):
        found = await payment.order_of_payment(request.app[BACKENDS], payment_id)
    if found is None:
        raise errors.PaymentNotFound()
    order_id, amount_cents = found
    settled = await request.app[INTEGRATIONS].gateway.settle(
        _webhook_url(request), payment_id, order_id, amount_cents, outcome
    )
    return json_response(settled.body())


def _webhook_url(request: web.Request) -> str:
    """Our own webhook, at the address this request reached (never the Host header)."""
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sock, tuple) and len(sock) >= 2:
        host, port = str(sock[0]), int(sock[1])
    else:
        host, port = request.app[SETTINGS].host, request.app[SETTINGS].port
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{WEBHOOK_PATH}"


async def _close(app: web.Application) -> None:
    await app[INTEGRATIONS].close()


def setup(app: web.Application) -> None:
    """Register the routes and the process's integrations (closed on cleanup)."""
    app[INTEGRATIONS] = Integrations.from_settings(app[SETTINGS])
    app.on_cleanup.append(_close)
    body = front.expect_continue  # a Content-Length past the bound: no "100 Continue"
    app.router.add_post("/api/v1/orders/{order_id}/pay", pay_order, expect_handler=body)
    app.router.add_post(WEBHOOK_PATH, payment_webhook, expect_handler=body)
    app.router.add_post(
        "/api/v1/admin/gateway/payments/{payment_id}/settle", settle_payment, expect_handler=body
    )
