"""The HTTP front's connections: every phase of a client's life is bounded.

aiohttp bounds the idle time between requests (``keepalive_timeout``) but not
the time a client takes to send a request head, nor the number of open
connections: a client that sends half a head and stops held its connection
(and a file descriptor) for an hour, and a few hundred of them took a process
past its fd limit. Here, per process:

- **head**: a request head must be complete within ``http_header_timeout_s``
  of the connection opening (first request) or of its first byte (later
  requests); else 408 in the contract's shape, and the connection is closed;
- **idle**: a kept-alive connection is closed ``http_keepalive_idle_s`` after
  its last response when no byte of a next request arrived (aiohttp's timer);
- **body**: a handler's whole read of a body is bounded by
  ``http_body_timeout_s`` (:func:`flashsale.web.routes.read_body`, 408), and
  a body left unread is discarded for at most as long before the close;
- **count**: at most ``http_max_connections`` open connections (clamped under
  the fd limit). A newcomer past the cap evicts the connection that has waited
  longest for a request head (idle keep-alive, or a slow head): slow clients
  cannot lock new ones out. Only when every connection is busy in a request
  is the newcomer refused: 503 ``unavailable`` with Retry-After, closed at once.

One :class:`FrontRunner` builds the server for ``flashsale serve``/``up`` and
for the tests. The handler subclasses aiohttp's RequestHandler and reads a few
of its attributes (``_request_count``, ``_messages``, ``_keepalive_handle``);
tests/integration/test_slow_clients.py pins the behaviour they give.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from flashsale.config import Settings
from flashsale.web.keys import SETTINGS
from flashsale.web.replies import error_response

log = logging.getLogger("flashsale.web.front")

# descriptors the process needs besides client connections: the Redis pool
# (<= 256), the PostgreSQL pool, the gateway's and carrier's HTTP clients,
# listening sockets, logs, embedded servers' pipes
FD_RESERVE = 512
WARN_EVERY_S = 10.0


def _raw_response(
    status: int, reason: str, code: str, message: str, retry_after_s: int | None = None
) -> bytes:
    """A complete response in the contract's shape, for a connection with no request object."""
    body = orjson.dumps({"error": {"code": code, "message": message}})
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close"]
    if retry_after_s is not None:
        head.append(f"Retry-After: {retry_after_s}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


HEAD_TIMEOUT = _raw_response(
    408, "Request Timeout", "request_timeout", "the request head was not received in time"
)
TOO_MANY = _raw_response(
    503, "Service Unavailable", "unavailable", "too many open connections; retry shortly", 1
)


@dataclass(frozen=True, slots=True)
class Limits:
    header_timeout_s: float
    body_timeout_s: float
    keepalive_idle_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(
            header_timeout_s=s.http_header_timeout_s,
            body_timeout_s=s.http_body_timeout_s,
            keepalive_idle_s=s.http_keepalive_idle_s,
            max_connections=fd_bounded(s.http_max_connections),
        )


def fd_bounded(wanted: int) -> int:
    """``wanted`` connections, or fewer when the fd limit cannot hold them with
    FD_RESERVE to spare. The soft limit is raised towards the hard one first
    (as Go's runtime does at start); past it, new connections would fail to be
    accepted and the process could no longer open its own backend connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit to %d: %r", target, exc)
    if soft == resource.RLIM_INFINITY:
        return wanted
    usable = soft - min(FD_RESERVE, soft // 2)
    if usable < wanted:
        log.warning(
            "open-file limit %d: at most %d HTTP connections (FLASHSALE_HTTP_MAX_CONNECTIONS=%d)",
            soft, usable, wanted,
        )
    return max(1, min(wanted, usable))


class FrontServer(web.Server):
    """aiohttp's Server, making FrontHandlers and counting them."""

    def __init__(self, made: web.Server, limits: Limits) -> None:
        super().__init__(
            made.request_handler, request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation, loop=made._loop, **made._kwargs,
        )
        self.limits = limits
        self.open = 0
        # connections waiting for a request head (idle or slow), oldest first
        self.waiting: dict[FrontHandler, None] = {}
        self.evicted = 0
        self.refused = 0
        self._warned_at = -WARN_EVERY_S

    def __call__(self) -> FrontHandler:
        return FrontHandler(self, loop=self._loop, **self._kwargs)

    def make_room(self) -> bool:
        """Close the connection that has waited longest for a request head, if any."""
        victim = next(iter(self.waiting), None)
        if victim is None:
            return False
        del self.waiting[victim]
        self.evicted += 1
        victim.abandon(TOO_MANY if victim.head_started else None)
        self._warn("evicting the longest-waiting connection")
        return True

    def refuse(self, transport: asyncio.BaseTransport) -> None:
        """503 and close, before reading anything: a client whose request lands
        after the close may see a reset instead of the 503 (a refusal either way)."""
        self.refused += 1
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(TOO_MANY)
        transport.close()
        self._warn("refusing new connections: every connection is busy in a request")

    def _warn(self, what: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "%d open connections (the cap): %s (%d evicted, %d refused so far)",
                self.open, what, self.evicted, self.refused,
            )


class FrontHandler(RequestHandler):
    """One client connection, with a request-head watchdog and a place in the count."""

    __slots__ = ("_accepted", "_close_after", "_front", "_head_timer", "_payload", "head_started")

    def __init__(self, manager: FrontServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._front = manager
        self._accepted = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._payload: StreamReader | None = None  # the body of the last request head
        self._close_after = False
        self.head_started = False  # bytes of a request head arrived, the head is not complete

    # -- connection -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        front = self._front
        if front.open >= front.limits.max_connections and not front.make_room():
            self._manager = None  # never registered: connection_lost does nothing
            self._force_close = True  # data_received ignores anything that arrives
            front.refuse(transport)
            return
        super().connection_made(transport)
        self._accepted = True
        front.open += 1
        front.waiting[self] = None
        # aiohttp armed its idle timer for the first request: the head timer governs it
        self._cancel_idle_timer()
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._accepted:
            self._accepted = False
            self._front.open -= 1
            self._front.waiting.pop(self, None)
            self._cancel_head_timer()
        super().connection_lost(exc)

    def abandon(self, response: bytes | None) -> None:
        """Close now, after ``response`` (raw bytes) when given."""
        if response is not None and self.transport is not None:
            self.transport.write(response)
        self.force_close()

    # -- request heads ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._accepted or self._force_close or self._close:
            return
        if data and (self._payload is None or self._payload.is_eof()):
            # between requests: these are bytes of a head; the idle phase is over
            self.head_started = True
            if self._head_timer is None:
                self._cancel_idle_timer()
                self._arm_head_timer()
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads and self._messages:  # a head is complete
            self._cancel_head_timer()
            self.head_started = False
            self._front.waiting.pop(self, None)
            self._payload = self._messages[-1][1]

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(
            self._front.limits.header_timeout_s, self._head_timed_out
        )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_idle_timer(self) -> None:
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None  # aiohttp arms it again after the next response

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._force_close:
            return
        if self in self._front.waiting:  # no request in progress
            del self._front.waiting[self]
            self.abandon(HEAD_TIMEOUT if self.head_started else None)
        else:  # a (pipelined) next head is late behind a request in progress
            self.close()

    # -- responses ------------------------------------------------------------------------

    def close_after_response(self) -> None:
        """Close once the response is sent, without reading what is left of the body."""
        self._close_after = True

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        if self._close_after:
            self.force_close()
        elif self._accepted and not self._force_close and not self._messages:
            self._front.waiting.pop(self, None)
            self._front.waiting[self] = None  # waits for its next head: last in line
        return result


def close_after_response(request: web.Request) -> None:
    """The request's connection closes once its response is sent."""
    protocol = request.protocol
    if isinstance(protocol, FrontHandler):
        protocol.close_after_response()


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """The Expect handler of every route taking a body: a Content-Length past
    the bound is refused before "100 Continue" would invite the body."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version != HttpVersion11:
        return None
    if expect.lower() != "100-continue":
        return error_response(417, "invalid_request", f"unsupported Expect: {expect[:64]}", None)
    limit = request.app[SETTINGS].body_max_bytes
    if request.content_length is not None and request.content_length > limit:
        resp = error_response(
            400, "invalid_request", f"the request body is larger than {limit} bytes", None
        )
        close_after_response(request)  # the client waits for our word: no body to discard
        return resp
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # as aiohttp's own handler: the body has not started
    return None


class FrontRunner(web.AppRunner):
    """The AppRunner of every flashsale HTTP front, with the Limits above."""

    def __init__(self, app: web.Application, settings: Settings, **kwargs: Any) -> None:
        self._limits = Limits.from_settings(settings)
        super().__init__(
            app, access_log=None, handle_signals=False,
            keepalive_timeout=settings.http_keepalive_idle_s,
            lingering_time=settings.http_body_timeout_s, **kwargs,
        )

    @property
    def limits(self) -> Limits:
        return self._limits

    async def _make_server(self) -> web.Server:
        return FrontServer(await super()._make_server(), self._limits)


async def start(
    app: web.Application, settings: Settings, host: str, port: int, **site: Any
) -> FrontRunner:
    """Set the app up and listen on ``host:port`` (0: any free port); the caller
    calls ``cleanup()`` on the returned runner."""
    runner = FrontRunner(app, settings)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, **site).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    port: int = runner.addresses[0][1]
    return port
