"""The reservation when Redis's reply is lost, and one bad item in a batch.

A TcpProxy (tests/chaos/faults.py) sits between the front and the machine's Redis.
The reservation request goes through (the script runs), then the reply is
lost: dropped with a reset, or swallowed until the front times out. The
contract: a 503 means nothing was reserved. So a buyer whose script ran gets
its 202, or a 503 after which nothing stays held (stock and limit back once
the outbox is swept), never a 503 with stock held; and a re-sent batch
never reserves twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import jwt

from flashsale import errors
from flashsale.config import Settings
from flashsale.core.backends import Backends
from flashsale.core.outcomes import Accepted
from flashsale.core.reserve import Reserver
from tests.chaos.faults import TcpProxy
from tests.support import JWT_SECRET, Api, eventually, running_app

REDIS_TIMEOUT_S = 0.3
RESOLVE_S = 0.6


@asynccontextmanager
async def proxied(settings: Settings) -> AsyncIterator[tuple[Api, TcpProxy]]:
    """The front with its Redis behind a proxy (short timeouts)."""
    assert settings.redis_url
    r = urlsplit(settings.redis_url)
    assert r.hostname and r.port
    async with TcpProxy(r.hostname, r.port) as proxy:
        s = replace(
            settings, redis_url=proxy.url(settings.redis_url),
            redis_timeout_s=REDIS_TIMEOUT_S, reserve_resolve_s=RESOLVE_S,
        )
        async with running_app(s) as api:
            yield api, proxy


async def held(b: Backends, sale_id: str, user: str) -> tuple[int, int, int, int]:
    """available, the buyer's held quantity, holds, stream length (Redis)."""
    k = b.keys(sale_id)
    available, mine = await b.redis.hget(k.sale, "available"), await b.redis.hget(k.users, user)
    return (int(available or 0), int(mine or 0), int(await b.redis.hlen(k.holds)),
            int(await b.redis.xlen(k.stream)))


async def swallowed(proxy: TcpProxy, at_least: int = 1) -> None:
    await eventually(lambda: _true(proxy.stats.replies_swallowed >= at_least), 5.0, 0.005)


async def _true(v: bool) -> bool:
    return v


async def test_reply_dropped_after_the_script_ran_reserves_once(settings: Settings) -> None:
    """The reply is dropped with a reset: redis-py reconnects and sends the
    batch again; the re-sent batch must answer the same order, not reserve again
    (old code: 202, but available and the buyer's count went down twice)."""
    async with proxied(settings) as (api, proxy):
        sid = (await api.create_sale(stock=5, per_user_limit=2))["sale_id"]
        proxy.drop_reply_once()
        status, body = await api.reserve(sid, "anon-1", 1)
        assert proxy.stats.replies_dropped == 1
        assert status in (202, 503), body
        if status == 202:
            assert body["quantity"] == 1
            assert await held(api.backends, sid, "anon-1") == (4, 1, 1, 1)
        else:  # a 503 must leave nothing held (after the outbox sweep)
            await asyncio.sleep(1.1)
            await api.compensate()
            assert (await held(api.backends, sid, "anon-1"))[:3] == (5, 0, 0)
        await api.drain(sid)
        led = await api.ledger(sid)
        assert led["consistent"], led


async def test_timeout_after_the_script_ran_answers_its_order(settings: Settings) -> None:
    """Replies are swallowed until the front times out (no re-send on a
    timeout): the front looks the order id up on a fresh connection, retrying
    until Redis answers, and answers the keyless buyer 202 (old code: 503
    'outcome unknown' while the order held stock and the buyer's limit)."""
    async with proxied(settings) as (api, proxy):
        sid = (await api.create_sale(stock=5, per_user_limit=1))["sale_id"]
        proxy.swallow_replies()
        task = asyncio.create_task(api.reserve(sid, "anon-2", 1))
        await swallowed(proxy)
        await asyncio.sleep(REDIS_TIMEOUT_S + 0.15)  # the front gave up; a lookup is swallowed
        proxy.swallow_replies(False)
        status, body = await task
        assert status == 202, body
        assert await held(api.backends, sid, "anon-2") == (4, 1, 1, 1)
        again = await api.reserve(sid, "anon-2", 1)
        assert again[0] == 409 and again[1]["error"]["code"] == "limit_exceeded"
        await api.drain(sid)
        row = await api.backends.pg.fetchrow(
            "SELECT status, user_id FROM orders WHERE order_id = $1", body["order_id"]
        )
        assert row is not None and row["status"] == "awaiting_payment"
        led = await api.ledger(sid)
        assert led["consistent"] and led["awaiting_payment"] == 1, led


async def test_unknown_outcome_keyless_is_released_before_503(settings: Settings) -> None:
    """The reply is lost and Redis stays unreachable past the lookup window:
    the keyless order is recorded released in PostgreSQL (so the consumer never
    persists it as a live order) before the 503, and its hold goes back once
    the outbox is swept (old code: 503, and the order then held stock and the
    buyer's limit until it expired)."""
    async with proxied(settings) as (api, proxy):
        b = api.backends
        sid = (await api.create_sale(stock=5, per_user_limit=1))["sale_id"]
        proxy.swallow_replies()
        started = time.monotonic()
        task = asyncio.create_task(api.reserve(sid, "anon-3", 1))
        await swallowed(proxy)
        proxy.cut()  # the script ran; now Redis is unreachable
        proxy.swallow_replies(False)
        status, body = await task
        elapsed = time.monotonic() - started
        proxy.heal()
        assert status == 503 and body["error"]["code"] == "unavailable", body
        assert elapsed < REDIS_TIMEOUT_S + RESOLVE_S + 2.0, elapsed
        assert (await held(b, sid, "anon-3"))[2:] == (1, 1), "the script ran"
        rows = await b.pg.fetch("SELECT order_id, status FROM orders WHERE sale_id = $1", sid)
        assert [r["status"] for r in rows] == ["failed"], rows
        await api.drain(sid)  # the consumer finds the order released: persists nothing
        await asyncio.sleep(1.1)  # the outbox grace
        await api.compensate()
        assert (await held(b, sid, "anon-3"))[:3] == (5, 0, 0), "stock and limit back"
        again = await api.reserve(sid, "anon-3", 1)
        assert again[0] == 202, again
        await api.drain(sid)
        led = await api.ledger(sid)
        assert led["consistent"] and led["awaiting_payment"] == 1 and led["failed"] == 1, led


async def test_unknown_outcome_keyed_is_resolved_by_the_keyed_retry(settings: Settings) -> None:
    """Same fault with an Idempotency-Key: the answer is 503 'outcome unknown,
    retry with the same key' (releasing would make the key's replay name a
    released order); the retry returns the order the script made."""
    async with proxied(settings) as (api, proxy):
        b = api.backends
        sid = (await api.create_sale(stock=5, per_user_limit=1))["sale_id"]
        proxy.swallow_replies()
        task = asyncio.create_task(api.reserve(sid, "buyer-4", 1, key="k-4"))
        await swallowed(proxy)
        proxy.cut()
        proxy.swallow_replies(False)
        status, body = await task
        proxy.heal()
        assert status == 503 and "same Idempotency-Key" in body["error"]["message"], body
        retry = await api.reserve(sid, "buyer-4", 1, key="k-4")
        assert retry[0] == 202, retry
        assert await held(b, sid, "buyer-4") == (4, 1, 1, 1)
        await api.drain(sid)
        led = await api.ledger(sid)
        assert led["consistent"] and led["awaiting_payment"] == 1 and led["failed"] == 0, led


async def test_a_voided_order_is_never_reserved_late(api: Api) -> None:
    """The lookup of an order id the script has not reserved voids it: the
    request, if it reaches Redis later (it sat in a socket buffer), reserves
    nothing. And a batch sent twice reserves once."""
    b = api.backends
    sid = (await api.create_sale(stock=5, per_user_limit=3))["sale_id"]
    k = b.keys(sid)
    now_ms = int(time.time() * 1000)
    lookup = await b.scripts.resolve_orders(
        keys=[k.sale, k.holds, k.void], args=[now_ms, 3_600_000, f"{sid}-late"]
    )
    assert [int(lookup[0]), lookup[1]] == [-6, b""]
    batch = _batch(k, now_ms, [(f"{sid}-late", "u"), (f"{sid}-twice", "v")])
    first = await b.scripts.reserve_batch(keys=batch[0], args=batch[1])
    assert int(first[0]) == -6 and int(first[2]) == 0
    second = await b.scripts.reserve_batch(keys=batch[0], args=batch[1])
    assert second == first, "the re-sent batch answers what the first did"
    assert await held(b, sid, "v") == (4, 1, 1, 1)
    assert await b.redis.hget(k.users, "u") is None
    found = await b.scripts.resolve_orders(
        keys=[k.sale, k.holds, k.void], args=[now_ms, 3_600_000, f"{sid}-twice"]
    )
    assert int(found[0]) == 0 and found[1] == first[3]


def _batch(k: Any, now_ms: int, items: list[tuple[str, str]]) -> tuple[list[Any], list[Any]]:
    keys: list[Any] = [
        k.sale, k.users, k.holds, k.pending, k.stream, k.void, k.room_used, k.room_admitted
    ]
    args: list[Any] = [now_ms, 3600, len(items)]
    for order_id, user in items:
        keys.append(k.sale)
        args.append("\x1f".join([order_id, user, "1", "0", f"{k.sale_id}|1", ""]))
    return keys, args


def _token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, JWT_SECRET, "HS256")


async def test_bad_sub_gets_401_and_its_batch_mates_202(api: Api) -> None:
    """A sub that cannot be encoded (a lone surrogate from JSON "\\ud800") or
    carries the unit separator is refused at authentication (old code: it
    reached the batch, whose packing raised: 503 for everyone in that tick)."""
    sid = (await api.create_sale(stock=20, per_user_limit=1))["sale_id"]
    bad = ["\ud800", "a\x1fb", "tab\there"]

    async def order(token: str) -> tuple[int, Any]:
        status, body, _ = await api.request(
            "POST", f"/api/v1/sales/{sid}/orders", json={},
            headers={"Authorization": f"Bearer {token}"},
        )
        return status, body

    tokens = [_token(f"honest-{i}") for i in range(6)] + [_token(s) for s in bad]
    results = await asyncio.gather(*(order(t) for t in tokens))
    assert [s for s, _ in results[:6]] == [202] * 6, results
    for status, body in results[6:]:
        assert status == 401 and body["error"]["code"] == "unauthorized", body


async def test_one_unencodable_item_fails_alone(api: Api) -> None:
    """The reserver packs each item on its own: an item that cannot be encoded
    or would break the packing fails alone, its batch mates are decided."""
    sid = (await api.create_sale(stock=20, per_user_limit=1))["sale_id"]
    reserver = Reserver(api.backends)
    users = ["ok-1", "\ud800", "ok-2", "x\x1fy", "ok-3"]
    got = await asyncio.gather(
        *(reserver.reserve(sid, u, 1, None) for u in users), return_exceptions=True
    )
    await reserver.close()
    assert [type(g) for g in got] == [
        Accepted, errors.Unauthorized, Accepted, errors.Unauthorized, Accepted
    ], got
    assert (await held(api.backends, sid, "ok-1"))[:3] == (17, 1, 3)
