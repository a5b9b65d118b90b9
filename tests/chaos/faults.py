"""Fault injection over loopback: a small asyncio TCP proxy of our own.

Put it between a process and Redis or PostgreSQL (rewrite the URL with
:meth:`TcpProxy.url`) and break the link on demand::

    async with TcpProxy("127.0.0.1", 5432) as proxy:
        dsn = proxy.url("postgresql://postgres@127.0.0.1:5432/test")
        proxy.delay(20, "down")      # every reply 20 ms late (latency, not bandwidth)
        proxy.cut()                  # server unreachable: live links reset, new ones refused
        proxy.heal()                 # reachable again
        proxy.drop_reply_once()      # the next reply is lost after the request went through
        proxy.blackhole()            # links stay open, nothing passes (timeouts)
        proxy.reset()                # reset live links, keep accepting
        proxy.swallow_replies()      # requests go through, replies vanish (clients time out)
        proxy.swallow_replies(False) # ... then the links that lost a reply are reset

Directions: ``"up"`` is client → server (requests), ``"down"`` is server →
client (replies). Data is forwarded chunk by chunk in order; a delay shifts
each chunk by the same latency, so pipelined traffic is not serialised.
Bytes a client sent before it died are still delivered to the server (as on
a real network), then the server sees the connection close.

The proxy runs in the event loop that called :meth:`start`; every control
method is synchronous and must be called from that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

Direction = Literal["up", "down", "both"]
CHUNK = 65536
_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass
class ProxyStats:
    """What went through the proxy since it started."""

    accepted: int = 0  # connections forwarded to the target
    refused: int = 0  # connections closed on arrival (cut) or whose target refused
    reset: int = 0  # live connections reset by cut() / reset() / drop_reply_once()
    bytes_up: int = 0
    bytes_down: int = 0
    replies_dropped: int = 0
    replies_swallowed: int = 0  # reply chunks discarded by swallow_replies() (link kept open)


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = False
        self.aborted = asyncio.Event()  # wakes a forwarder waiting out a delay

    def abort(self) -> None:
        """Reset both sides now (RST where the OS allows it)."""
        if self.closed:
            return
        self.closed = True
        self.aborted.set()
        for w in (self.client, self.upstream):
            with contextlib.suppress(OSError, RuntimeError):
                sock = w.get_extra_info("socket")
                if sock is not None:  # SO_LINGER 0: close() sends RST, not FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            w.transport.abort()


class TcpProxy:
    """Forwards ``host:port`` (``port`` 0: any free one) to ``target_host:target_port``."""

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self._listen_port = port
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusing = False
        self._blackhole = False
        self._delay_s: dict[str, float] = {"up": 0.0, "down": 0.0}
        self._drop_replies = 0
        self._swallow = False
        self._swallowed: set[_Link] = set()
        self.stats = ProxyStats()

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accept, self.host, self._listen_port)

    async def close(self) -> None:
        """Stop listening and reset every live connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.reset()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- addressing -----------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def url(self, url: str) -> str:
        """``url`` (redis://, postgresql://, ...) with its host:port replaced by the proxy's."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@" if userinfo else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}{self.host}:{self.port}"))

    @property
    def live(self) -> int:
        """Connections currently forwarded."""
        return len(self._links)

    # -- faults ---------------------------------------------------------------

    def cut(self) -> None:
        """The target becomes unreachable: live connections are reset and new
        ones are closed as soon as they are accepted."""
        self._refusing = True
        self.reset()

    def heal(self) -> None:
        """Undo cut() and blackhole(); delays stay as set."""
        self._refusing = False
        self._blackhole = False

    def reset(self) -> None:
        """Reset every live connection; new connections are still accepted."""
        for link in list(self._links):
            if not link.closed:
                self.stats.reset += 1
            link.abort()

    def delay(self, ms: float, direction: Direction = "both") -> None:
        """Add ``ms`` of latency to every chunk going ``direction`` (0 removes it)."""
        if ms < 0:
            raise ValueError("delay must be >= 0")
        for d in ("up", "down"):
            if direction in (d, "both"):
                self._delay_s[d] = ms / 1000

    def drop_reply_once(self, count: int = 1) -> None:
        """The next ``count`` replies (server → client chunks) are discarded and
        their connection reset: the server did the work, the client never hears."""
        self._drop_replies += count

    def swallow_replies(self, on: bool = True) -> None:
        """While on, requests still reach the server (it does the work) but every
        reply is discarded and the link stays open: clients time out. Turning it
        off resets every link that lost a reply (its byte stream is broken)."""
        self._swallow = on
        if not on:
            for link in list(self._swallowed):
                if not link.closed:
                    self.stats.reset += 1
                link.abort()
            self._swallowed.clear()

    def blackhole(self, on: bool = True) -> None:
        """Keep connections open but pass nothing either way (clients time out)."""
        self._blackhole = on

    async def wait_connections(self, count: int, timeout_s: float = 10.0) -> None:
        """Wait until at least ``count`` connections have been accepted in total."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.stats.accepted < count:
            if loop.time() > deadline:
                raise TimeoutError(f"{self.stats.accepted} of {count} connections in {timeout_s}s")
            await asyncio.sleep(0.01)

    # -- forwarding -----------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.stats.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            self.stats.refused += 1
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        if self._refusing:  # cut while we were connecting
            self.stats.refused += 1
            link.abort()
            return
        self.stats.accepted += 1
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pump(link, reader, up_writer, "up"),
                self._pump(link, up_reader, writer, "down"),
            )
        finally:
            self._links.discard(link)
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    async def _pump(
        self, link: _Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str
    ) -> None:
        """Read chunks as they come; a second task writes each one when due. What
        was read before the source closed or reset is still delivered."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        writer = asyncio.create_task(self._forward(link, queue, dst, direction))
        broken = False
        try:
            while not link.closed:
                data = await src.read(CHUNK)
                if not data:
                    break
                queue.put_nowait((loop.time() + self._delay_s[direction], data))
        except (ConnectionError, OSError):
            broken = True
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await writer
        if broken:
            link.abort()

    async def _forward(
        self, link: _Link, queue: asyncio.Queue[tuple[float, bytes] | None],
        dst: asyncio.StreamWriter, direction: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await queue.get()
            if item is None or link.closed:
                break
            due, data = item
            if due > loop.time():  # an abort drops what is still held back
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(link.aborted.wait(), due - loop.time())
            if link.closed:
                break
            if self._blackhole:
                continue
            if direction == "down" and self._swallow:
                self.stats.replies_swallowed += 1
                self._swallowed.add(link)
                continue
            if direction == "down" and self._drop_replies > 0:
                self._drop_replies -= 1
                self.stats.replies_dropped += 1
                self.stats.reset += 1
                link.abort()
                break
            if direction == "up":
                self.stats.bytes_up += len(data)
            else:
                self.stats.bytes_down += len(data)
            try:
                dst.write(data)
                await dst.drain()
            except (ConnectionError, OSError):
                link.abort()
                break
        if item is None and not link.closed and dst.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):  # the source closed: pass it on
                dst.write_eof()
