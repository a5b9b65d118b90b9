"""Partial bodies, slow and idle clients, the connection cap: a running app
reached through real TCP sockets that split, stall and drip their requests.

Timeouts are configured small (Settings) so each test takes a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from flashsale.commerce.signature import SIGNATURE_HEADER, signature
from flashsale.config import Settings
from tests.commerce import WEBHOOK, running_shop, shop_settings
from tests.support import ADMIN_TOKEN, JWT_SECRET, WEBHOOK_SECRET, Api, running_app

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


# -- 2. slow and idle clients ------------------------------------------------------------


async def test_half_header_connections_are_closed_within_the_header_timeout(
    settings: Settings,
) -> None:
    """100 connections send half a request head and stop: each is closed by the
    server within the header timeout (it used to keep them for an hour), with a
    408 in the contract's shape; /healthz answers meanwhile."""
    timeout_s = 1.0
    async with app_with(settings, http_header_timeout_s=timeout_s) as api:
        port = port_of(api)
        started = time.monotonic()
        async with connections(port, 100, HALF_HEAD) as conns:
            assert (await healthz(port)).status == 200
            closed = await asyncio.gather(
                *(c.closed_within(timeout_s + SLACK_S) for c in conns)
            )
            elapsed = time.monotonic() - started
        assert all(closed), f"{closed.count(False)} of 100 still open after {elapsed:.1f}s"
        assert elapsed < timeout_s + SLACK_S + 1.0
        # one of them, looked at closely: a 408 in the contract's shape, then close
        async with connections(port, 1, HALF_HEAD) as (c,):
            r = await c.response(timeout_s + SLACK_S)
            assert r.status == 408
            assert r.json()["error"]["code"] == "request_timeout"
            assert await c.closed_within(SLACK_S)


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(
    settings: Settings,
) -> None:
    async with (
        app_with(settings, http_header_timeout_s=1.0, http_keepalive_idle_s=30.0) as api,
        connections(port_of(api), 1, b"") as (c,),
    ):
        started = time.monotonic()
        assert await c.closed_within(1.0 + SLACK_S)
        assert time.monotonic() - started > 0.8


async def test_idle_keepalive_connection_is_closed_after_the_idle_time(
    settings: Settings,
) -> None:
    """A kept-alive connection used within the idle time stays open; idle for
    longer, the server closes it (it used to wait about an hour)."""
    idle_s = 1.0
    async with (
        app_with(settings, http_keepalive_idle_s=idle_s, http_header_timeout_s=30.0) as api,
        connections(port_of(api), 1, b"") as (c,),
    ):
        for _ in range(3):  # each request within the idle time: the same connection
            await c.send(request("GET", "/healthz"))
            assert (await c.response()).status == 200
            await asyncio.sleep(idle_s / 2)
        started = time.monotonic()
        assert await c.closed_within(idle_s + SLACK_S)
        assert time.monotonic() - started > idle_s / 2 - 0.2


async def test_the_next_request_head_has_the_header_timeout_not_the_idle_time(
    settings: Settings,
) -> None:
    """On a kept-alive connection, the first byte of the next request ends the
    idle phase: its head must then be complete within the header timeout."""
    async with (
        app_with(settings, http_keepalive_idle_s=30.0, http_header_timeout_s=1.0) as api,
        connections(port_of(api), 1, b"") as (c,),
    ):
        await c.send(request("GET", "/healthz"))
        assert (await c.response()).status == 200
        await c.send(HALF_HEAD)
        started = time.monotonic()
        r = await c.response(1.0 + SLACK_S)
        assert r.status == 408
        assert await c.closed_within(SLACK_S)
        assert time.monotonic() - started < 1.0 + SLACK_S


async def test_a_drip_fed_body_is_cut_at_the_body_timeout(settings: Settings) -> None:
    """The unauthenticated webhook, a byte every 100 ms of a 200-byte body: 408
    request_timeout at the body timeout, and the connection is closed."""
    timeout_s = 1.0
    async with (
        app_with(settings, http_body_timeout_s=timeout_s) as api,
        connections(port_of(api), 1, b"") as (c,),
    ):
        head = request("POST", WEBHOOK, body=b"x" * 200, Content_Type="application/json")
        await c.send(head[:-200])
        started = time.monotonic()

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(200):
                    await c.send(b"x")
                    await asyncio.sleep(0.1)

        dripper = asyncio.create_task(drip())
        try:
            r = await c.response(timeout_s + SLACK_S)
            elapsed = time.monotonic() - started
            assert r.status == 408, r
            assert r.json()["error"]["code"] == "request_timeout"
            assert timeout_s - 0.2 < elapsed < timeout_s + SLACK_S
            assert await c.closed_within(SLACK_S)
        finally:
            dripper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dripper


async def test_an_oversize_content_length_on_the_webhook_is_refused_before_the_body(
    api: Api,
) -> None:
    """Content-Length past the 16 KiB bound: 400 invalid_request at once, no body
    sent; with Expect: 100-continue, no "100 Continue" inviting the body first."""
    for expect in (b"", b"Expect: 100-continue\r\n"):
        async with connections(port_of(api), 1, b"") as (c,):
            head = request("POST", WEBHOOK, Content_Type="application/json")
            await c.send(head.replace(
                b"Content-Length: 0\r\n", b"Content-Length: 100000000\r\n" + expect
            ))
            r = await c.response(2.0)
            assert r.status == 400, (expect, r)
            assert r.json()["error"]["code"] == "invalid_request"


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


# -- 2. the connection cap ---------------------------------------------------------------


async def test_slow_connections_past_the_cap_evict_the_oldest_waiting_ones(
    settings: Settings,
) -> None:
    """Cap 20, 50 slow-header connections: the process never holds more than 20;
    each newcomer evicts the oldest connection still waiting for a request
    head, so /healthz on a new connection answers at once (the old code held
    all 50, and past its fd limit accepted none)."""
    cap = 20
    async with app_with(settings, http_max_connections=cap, http_header_timeout_s=30.0) as api:
        port = port_of(api)
        async with connections(port, 50, HALF_HEAD) as conns:
            closed = await asyncio.gather(*(c.closed_within(SLACK_S) for c in conns))
            assert closed == [True] * 30 + [False] * 20, closed
            started = time.monotonic()
            assert (await healthz(port)).status == 200
            assert time.monotonic() - started < SLACK_S
            assert await conns[30].closed_within(SLACK_S)  # the oldest left made room


async def test_connections_past_the_cap_are_refused_when_all_are_busy(
    settings: Settings,
) -> None:
    """Cap 10, ten connections busy in a request (a webhook body still coming):
    a new connection is answered 503 unavailable with Retry-After and closed at
    once; the busy ones are served when their bodies complete, and new
    connections are accepted again."""
    cap = 10
    async with app_with(settings, http_max_connections=cap, http_body_timeout_s=30.0) as api:
        port = port_of(api)
        body = orjson.dumps({"event_id": "evt_x"})
        head = request("POST", WEBHOOK, body=body, Content_Type="application/json")
        async with connections(port, cap, head[:-5]) as busy:
            await asyncio.sleep(0.2)  # their heads are parsed: each handler waits for its body
            started = time.monotonic()
            r = await healthz(port)
            assert r.status == 503, r
            assert r.json()["error"]["code"] == "unavailable"
            assert r.headers["retry-after"] == "1"
            assert time.monotonic() - started < SLACK_S
            for c in busy:
                await c.send(head[-5:])
            for c in busy:  # unsigned: refused in the contract's shape, not dropped
                assert (await c.response()).status == 400
        assert (await healthz(port)).status == 200


# -- 2. the scenario: `flashsale serve` under a low fd limit -----------------------


FD_LIMIT = 256
REPO = Path(__file__).resolve().parents[2]


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _spawn_serve(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "flashsale", "serve"], env=env,
        stdin=subprocess.DEVNULL, preexec_fn=_low_fd_limit, cwd=REPO,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.asynccontextmanager
async def serve_process(
    redis_url: str, database_url: str, tmp: Path, **env: str
) -> AsyncIterator[int]:
    """`flashsale serve` as a child process with FD_LIMIT descriptors; yields its port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    child_env.update(
        FLASHSALE_REDIS_URL=redis_url, FLASHSALE_DATABASE_URL=database_url,
        FLASHSALE_PORT=str(port), FLASHSALE_DATA_DIR=str(tmp),
        FLASHSALE_ADMIN_TOKEN=ADMIN_TOKEN, FLASHSALE_JWT_SECRET=JWT_SECRET,
        FLASHSALE_WEBHOOK_SECRET=WEBHOOK_SECRET, FLASHSALE_LOG_LEVEL="ERROR",
        FLASHSALE_KEY_PREFIX="t" + secrets.token_hex(6), **env,
    )
    proc = _spawn_serve(child_env)
    try:
        deadline = time.monotonic() + 30.0
        while True:
            with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
                if (await healthz(port)).status == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            await asyncio.sleep(0.1)
        yield port
    finally:
        _stop(proc)


async def test_slow_heads_past_the_fd_limit_do_not_take_healthz_down(
    redis_url: str, database_url: str, tmp_path: Path
) -> None:
    """The reported failure: `flashsale serve` with 256 descriptors and 300
    connections sending half a head. The cap (clamped under the fd limit) keeps
    descriptors for the process; new connections evict the slow ones, so
    /healthz and /readyz answer at once (the old code ran out of descriptors
    and accepted nothing more: /healthz timed out)."""
    async with (
        serve_process(redis_url, database_url, tmp_path) as port,
        connections(port, 300, HALF_HEAD) as slow,
    ):
        for path in ("/healthz", "/readyz"):
            started = time.monotonic()
            c = await Raw.open(port)
            try:
                await c.send(request("GET", path, Connection="close"))
                r = await c.response(2.0)
            finally:
                c.close()
            assert r.status == 200, (path, r)
            assert time.monotonic() - started < 2.0
        closed = await asyncio.gather(*(c.closed_within(0.5) for c in slow))
        assert closed.count(False) <= FD_LIMIT // 2, "the cap holds under the fd limit"
