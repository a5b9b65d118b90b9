"""The restart guard and the lost-writes verification, on the real servers.

The guard is the Redis client's connection hook: a new connection to a server
whose run_id this process has not verified is refused before any command is
sent. The verification rebuilds the sales whose stream is behind the
watermark PostgreSQL keeps (the last entry it persisted), and freezes one
whose rebuild is refused rather than leave the process unverified.
"""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from flashsale.config import Settings
from flashsale.core import ledger
from flashsale.core.backends import RedisUnverified, RestartGuard, redis_client
from tests.support import Api, eventually


async def test_a_server_not_verified_is_refused_before_any_command(settings: Settings) -> None:
    guard = RestartGuard()
    asked: list[bool] = []
    guard.on_unverified = lambda: asked.append(True)
    client = redis_client(settings, guard)
    plain = redis_client(settings)
    try:
        with pytest.raises(RedisUnverified):
            await client.ping()
        assert asked, "the owner was not told"
        info = await plain.info("server")
        guard.verified(str(info["run_id"]))
        assert await client.ping() is True
        guard.verified("another-server")  # as after a restart: the next connection is refused
        assert isinstance(client, Redis)
        await client.connection_pool.disconnect()
        with pytest.raises(RedisUnverified):
            await client.set(f"{settings.key_prefix}:never", "1")
        assert await plain.exists(f"{settings.key_prefix}:never") == 0
    finally:
        await client.aclose()
        await plain.aclose()


async def test_verification_rebuilds_a_sale_whose_stream_is_behind(api: Api) -> None:
    b = api.backends
    sid = (await api.create_sale(stock=4, per_user_limit=4))["sale_id"]
    k = b.keys(sid)
    assert (await api.reserve(sid, "u1", 3))[0] == 202
    await api.drain(sid)
    # Redis lost writes PostgreSQL has: the stream is gone, the hash says 4 left
    await b.redis.delete(k.stream, k.holds, k.users)
    await b.redis.hset(k.sale, "available", 4)
    run_id = await ledger.verify_server(b)
    assert run_id == str((await b.redis.info("server"))["run_id"])
    assert await b.redis.hget(k.sale, "available") == b"1"
    assert (await ledger.ledger(b, sid))["consistent"] is True
    assert await ledger.rebuild_lost_writes(b) == []  # the stream is no longer behind


async def test_verification_freezes_a_sale_it_cannot_rebuild(api: Api) -> None:
    b = api.backends
    sid = (await api.create_sale(stock=4, per_user_limit=4))["sale_id"]
    k = b.keys(sid)
    assert (await api.reserve(sid, "u1", 3))[0] == 202
    await api.drain(sid)
    await b.redis.delete(k.stream)
    await b.redis.hset(k.holds, "bad", "garbage")  # the rebuild script refuses this
    await ledger.verify_server(b)  # verified all the same: the sale is frozen
    assert await b.redis.exists(k.sale) == 0
    status, body = await api.reserve(sid, "u2", 1)
    assert status == 503 and body["error"]["code"] == "unavailable"
    await b.redis.hdel(k.holds, "bad")
    await ledger.rebuild(b, sid)  # (or the rebuild that reservation triggered)
    await eventually(lambda: b.redis.exists(k.sale))
    assert (await ledger.ledger(b, sid))["consistent"] is True
