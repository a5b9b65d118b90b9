"""Partial bodies, slow and idle clients, the connection cap: a running app
reached through real TCP sockets that split, stall and drip their requests.

Timeouts are configured small (Settings) so each test takes a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import orjson

from flashsale.config import Settings
from flashsale.payment import SIGNATURE_HEADER, signature
from tests.commerce import WEBHOOK, running_shop, shop_settings
from tests.support import WEBHOOK_SECRET, Api, running_app

SLACK_S = 1.0  # scheduling slack on a loaded 2-core machine
HALF_HEAD = b"POST /api/v1/sales/s/orders HTTP/1.1\r\nHost: flashsale\r\nContent-Le"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Raw:
    """One client TCP connection written to by hand (no HTTP library buffering)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one write, one segment
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout_s: float = 5.0) -> Response:
        async with asyncio.timeout(timeout_s):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return Response(status, headers, body)

    async def closed_within(self, timeout_s: float) -> bool:
        """True when the server closes (EOF or reset) within ``timeout_s``;
        bytes it sends first (an error response) are read and dropped."""
        try:
            async with asyncio.timeout(timeout_s):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


def port_of(api: Api) -> int:
    port = urlsplit(api.base).port
    assert port is not None
    return port


def request(method: str, path: str, *, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: flashsale"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@contextlib.asynccontextmanager
async def app_with(settings: Settings, **overrides: Any) -> AsyncIterator[Api]:
    async with running_app(replace(settings, **overrides)) as api:
        yield api


@contextlib.asynccontextmanager
async def connections(port: int, count: int, first: bytes) -> AsyncIterator[list[Raw]]:
    """``count`` connections opened one after the other, each sending ``first``."""
    conns: list[Raw] = []
    try:
        for _ in range(count):
            c = await Raw.open(port)
            conns.append(c)
            if first:
                await c.send(first)
        yield conns
    finally:
        for c in conns:
            c.close()


async def healthz(port: int) -> Response:
    c = await Raw.open(port)
    try:
        await c.send(request("GET", "/healthz", Connection="close"))
        return await c.response()
    finally:
        c.close()


# -- 1. partial bodies -------------------------------------------------------------------


async def test_reservation_body_in_two_segments_is_accepted(api: Api) -> None:
    """The body's second half arrives 100 ms after the first: the handler reads
    the whole body (it used to parse what had arrived: 400 invalid_request)."""
    sale = await api.create_sale(stock=5)
    body = orjson.dumps({"quantity": 1})
    raw = request(
        "POST", f"/api/v1/sales/{sale['sale_id']}/orders", body=body,
        Authorization=f"Bearer {api.token('split-buyer')}", Content_Type="application/json",
        Idempotency_Key=secrets.token_hex(8), Connection="close",
    )
    cut = len(raw) - len(body) + 5
    c = await Raw.open(port_of(api))
    try:
        await c.send(raw[:cut])
        await asyncio.sleep(0.1)
        await c.send(raw[cut:])
        r = await c.response()
    finally:
        c.close()
    assert r.status == 202, r
    assert r.json()["quantity"] == 1


async def test_signed_webhook_in_two_segments_is_processed(
    redis_url: str, database_url: str
) -> None:
    """A real payment's webhook split in two segments: 200 and the order is paid
    (it used to be 400 invalid_signature: a gateway treats 400 as final)."""
    async with running_shop(shop_settings(redis_url, database_url)) as shop:
        sale = await shop.api.create_sale(stock=3, price_cents=500)
        order_id = await shop.order(sale["sale_id"], "split-payer")
        p = await shop.paid_payment(order_id, "split-payer")
        body = orjson.dumps(shop.event(p))
        raw = request(
            "POST", WEBHOOK, body=body, Content_Type="application/json", Connection="close",
            **{SIGNATURE_HEADER: signature(WEBHOOK_SECRET, int(time.time()), body)},
        )
        cut = len(raw) - len(body) + len(body) // 2
        c = await Raw.open(port_of(shop.api))
        try:
            await c.send(raw[:cut])
            await asyncio.sleep(0.1)
            await c.send(raw[cut:])
            r = await c.response()
        finally:
            c.close()
        assert r.status == 200, r
        assert r.json()["outcome"] == "paid"
        assert await shop.status_of(order_id) == "paid"


async def test_a_chunked_body_is_stopped_at_the_bound(api: Api) -> None:
    """No Content-Length: the bound is enforced while reading, not after the end."""
    async with connections(port_of(api), 1, b"") as (c,):
        head = request("POST", WEBHOOK, Content_Type="application/json",
                       Transfer_Encoding="chunked")
        await c.send(head.replace(b"Content-Length: 0\r\n", b""))
        for _ in range(6):  # 24 KiB of a never-ending body
            await c.send(b"1000\r\n" + b"x" * 4096 + b"\r\n")
        r = await c.response(2.0)
        assert r.status == 400, r
        assert r.json()["error"]["code"] == "invalid_request"
