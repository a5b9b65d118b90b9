"""Connections to Redis and PostgreSQL, opened and closed by their owner
(the app's cleanup_ctx, or a CLI command) — never module globals."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.typing import EncodableT
from redis.utils import HIREDIS_AVAILABLE

from flashsale.config import Settings
from flashsale.core.keys import SaleKeys
from flashsale.core.scripts import RedisClient, Scripts


class HiredisPack:
    """redis-py's asyncio connection packs every command in Python; with
    hiredis installed (it is, for parsing) redis-py's own C-backed serializer
    gives the same bytes several times faster. Measured in the bench profile:
    packing was most of the client's CPU per reservation batch and per
    drained row. Mixed into each connection class the clients use."""

    _serializer = HiredisRespSerializer()  # type: ignore[no-untyped-call]  # untyped in redis-py 8

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        packed: list[bytes] = self._serializer.pack(*args)  # type: ignore[arg-type]  # stub says List
        return packed


class HiredisPackConnection(HiredisPack, Connection):
    """A plain connection that packs commands with hiredis (``HiredisPack``)."""


class RedisUnverified(RedisConnectionError):
    """Redis is a server this process has not verified yet (it restarted, or
    the process just started): nothing runs on it until its data is checked
    against PostgreSQL. A connection error (the connection is refused before
    any command is sent): callers answer 503 and retry."""


class RestartGuard:
    """Notices a Redis server that this process has not verified, before any
    command runs on it.

    A restart breaks every connection, so whatever a restarted Redis is asked
    goes through a NEW connection; the guard is the connection hook of the
    client (redis-py's ``redis_connect_func``): it asks the server's run_id
    (``INFO server``, one round trip per new connection) and, when it is not
    the run_id last verified, refuses the connection (``RedisUnverified``:
    the command fails, no reservation script runs) and calls
    ``on_unverified``. Its owner then verifies the server through a client of
    its own (PostgreSQL's stream watermarks against the streams, rebuilding
    what lost writes) and calls :meth:`verified`.
    """

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.on_unverified: Callable[[], None] | None = None

    def verified(self, run_id: str) -> None:
        self.run_id = run_id

    async def connect(self, conn: Connection) -> None:
        await conn.on_connect()
        await conn.send_command("INFO", "server")
        run_id = server_run_id(await conn.read_response())
        if run_id == self.run_id:
            return
        if self.on_unverified is not None:
            self.on_unverified()
        raise RedisUnverified(f"Redis server {run_id} is not verified yet; retry shortly")


def server_run_id(info: object) -> str:
    """The run_id line of an ``INFO server`` reply (a new one at every restart;
    '' for a server that has none)."""
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line[len("run_id:"):].strip()
    return ""


class HiredisPackSentinelConnection(HiredisPack, SentinelManagedConnection):
    """A Sentinel-managed connection (it asks the sentinels for the primary on
    every connect, so a failover is followed by the next reconnect) that packs
    commands with hiredis (``HiredisPack``)."""


@dataclass(frozen=True, slots=True)
class Backends:
    settings: Settings
    redis: RedisClient
    pg: asyncpg.Pool
    scripts: Scripts
    guard: RestartGuard | None = None  # set: every new Redis connection is checked

    def keys(self, sale_id: str) -> SaleKeys:
        return SaleKeys(self.settings.key_prefix, sale_id, self.settings.redis_cluster)


# redis-py's own retries send a command again after a timeout or a broken
# link, blind to whether it ran. For the reservation script that is a second
# reservation attempt (made harmless by reserve_batch-8.lua's per-order-id check,
# but it doubles the wait); reserve.py instead asks Redis what happened
# (resolve_orders) on a fresh connection. So: standalone, no retry at all
# (stated, not left to redis-py's defaults, which differ by constructor);
# cluster, one (redis-py's default is 10 with backoff, ~20 s of re-sends at
# the default timeout), kept so that a failover's MOVED/CLUSTERDOWN is
# followed once after the client refreshes its slot map.
STANDALONE_RETRIES = 0
CLUSTER_RETRIES = 1


def redis_client(settings: Settings, guard: RestartGuard | None = None) -> RedisClient:
    """A standalone client, a cluster client (the URL is a seed node) when
    FLASHSALE_REDIS_CLUSTER is set (every script's keys share the sale's slot),
    or, with FLASHSALE_REDIS_SENTINELS, a client of the primary the sentinels
    name (see sentinel_client). ``guard`` checks every new connection
    (standalone and Sentinel: the cluster client keeps the connection hook for
    itself)."""
    if settings.redis_sentinels:
        return sentinel_client(settings, guard)
    assert settings.redis_url, "redis_url must be set (embedded servers fill it in)"
    if settings.redis_cluster:
        return RedisCluster.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            max_connections=256,
            retry=Retry(NoBackoff(), CLUSTER_RETRIES),
        )
    return Redis.from_url(
        settings.redis_url,
        connection_class=HiredisPackConnection if HIREDIS_AVAILABLE else Connection,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=10,
        max_connections=256,
        redis_connect_func=guard.connect if guard is not None else None,
        retry=Retry(NoBackoff(), STANDALONE_RETRIES),
    )


def sentinel_client(settings: Settings, guard: RestartGuard | None = None) -> Redis:
    """A client of the primary of ``redis_sentinel_master``: redis-py's
    SentinelConnectionPool asks the sentinels for the primary's address on each
    new connection and drops its idle connections when the address changed; a
    connection to a demoted primary is closed on its first READONLY reply. So a
    failover costs the commands in flight (they fail as a broken connection
    would) and the next ones go to the new primary: no restart.

    A sentinel's answer counts only if it sees at least one other sentinel (when
    more than one is configured), so a sentinel cut off from its peers cannot
    send clients to a stale primary.

    A promoted replica is another server (another run_id) than the primary the
    ``guard`` verified: its first connection is refused until the server is
    verified against PostgreSQL's stream watermarks (it may lack the last
    writes the consumer persisted from the old primary). redis-py's
    SentinelManagedConnection connects through Connection.connect_check_health,
    which calls ``redis_connect_func`` after every (re)connect, as for a
    standalone client. No client retry, as standalone (see STANDALONE_RETRIES):
    a broken reservation is resolved by reserve.py, never re-sent blind."""
    timeout = settings.redis_timeout_s
    sentinel = Sentinel(
        list(settings.redis_sentinels),
        min_other_sentinels=1 if len(settings.redis_sentinels) > 1 else 0,
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
    )
    client: Redis = sentinel.master_for(
        settings.redis_sentinel_master,
        connection_class=HiredisPackSentinelConnection if HIREDIS_AVAILABLE
        else SentinelManagedConnection,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=10,
        max_connections=256,
        redis_connect_func=guard.connect if guard is not None else None,
        retry=Retry(NoBackoff(), STANDALONE_RETRIES),
    )
    return client


async def close_redis(redis: RedisClient) -> None:
    """Close a client from redis_client (and the sentinels' own connections)."""
    pool = getattr(redis, "connection_pool", None)
    try:
        await redis.aclose()
    finally:
        if isinstance(pool, SentinelConnectionPool):
            await pool.sentinel_manager.aclose()


async def _keep_session(conn: object) -> None:
    """A pooled connection's reset on release: nothing beyond asyncpg's own
    (which rolls back a transaction left open). asyncpg's default sends
    ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` -- a further
    round trip on every pool use -- to undo session state; flashsale keeps none
    on pooled connections (no SET, LISTEN or cursor outside a transaction;
    core/migrate.py releases its advisory lock itself)."""


async def pg_pool(settings: Settings) -> asyncpg.Pool:
    assert settings.database_url, "database_url must be set (embedded servers fill it in)"
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.pg_pool_min,
        max_size=settings.pg_pool_max,
        timeout=settings.pg_timeout_s,
        command_timeout=settings.pg_timeout_s * 6,
        reset=_keep_session,
    )
    assert pool is not None
    return pool


@asynccontextmanager
async def open_backends(settings: Settings, *, guarded: bool = False) -> AsyncIterator[Backends]:
    """``guarded``: with a RestartGuard (standalone or Sentinel), for processes that
    reserve; its owner verifies the server (see web/rebuilds.py)."""
    guard = RestartGuard() if guarded and not settings.redis_cluster else None
    redis = redis_client(settings, guard)
    try:
        pool = await pg_pool(settings)
        try:
            scripts = Scripts.register(redis)
            yield Backends(settings, redis, pool, scripts, guard)
        finally:
            await pool.close()
    finally:
        await close_redis(redis)


@asynccontextmanager
async def unguarded(b: Backends) -> AsyncIterator[Backends]:
    """The same servers through a Redis client of its own, without the guard:
    to verify a server before the guarded client may use it."""
    redis = redis_client(b.settings)
    try:
        yield Backends(b.settings, redis, b.pg, Scripts.register(redis))
    finally:
        await close_redis(redis)
