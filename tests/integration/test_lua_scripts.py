"""Each Lua script alone, through the one loader: every return code."""

from __future__ import annotations

import time
from typing import Any

from flashsale.backends import Backends
from flashsale.keys import SaleKeys
from flashsale.reserve import fingerprint
from tests.support import Api

GROUP = "persist"


async def load(b: Backends, k: SaleKeys, stock: int = 3, limit: int = 2, *,
               starts_ms: int = 0, ends_ms: int = 0) -> int:
    return int(await b.scripts.load_sale(
        keys=[k.sale, k.stream, k.restocks],
        args=[stock, limit, 100, starts_ms, ends_ms, 60_000, GROUP],
    ))


async def reserve(b: Backends, k: SaleKeys, items: list[tuple[str, str, int, str | None]],
                  now_ms: int | None = None) -> list[tuple[int, str]]:
    now_ms = now_ms or int(time.time() * 1000)
    keys = [k.sale, k.users, k.holds, k.pending, k.stream, k.void]
    args: list[Any] = [now_ms, 3600, len(items)]
    for order_id, user, qty, key in items:
        keys.append(k.idempotency(user, key) if key else k.sale)
        fp = fingerprint(k.sale_id, qty)
        fields = [order_id, user, str(qty), "1" if key else "0", fp, key or ""]
        args.append("\x1f".join(fields))
    raw = await b.scripts.reserve_batch(keys=keys, args=args)
    return [(int(raw[i]), raw[i + 1].decode()) for i in range(0, len(raw), 2)]


def keys_of(api: Api, sale_id: str = "sl_lua000000001") -> SaleKeys:
    return api.backends.keys(sale_id)


async def test_load_sale_once(api: Api) -> None:
    b, k = api.backends, keys_of(api)
    assert await load(b, k) == 1
    assert await load(b, k, stock=99) == 0
    assert await b.redis.hget(k.sale, "available") == b"3"
    groups = await b.redis.xinfo_groups(k.stream)
    assert [g["name"] for g in groups] == [GROUP.encode()]


async def test_reserve_every_code_and_precedence(api: Api) -> None:
    b, k = api.backends, keys_of(api)
    assert await reserve(b, k, [("o1", "u", 1, None)]) == [(-1, "")]  # sale_not_found
    await load(b, k, stock=3, limit=2)
    res = await reserve(b, k, [
        ("o1", "u", 2, "k1"),      # accepted
        ("o2", "u", 1, "k1"),      # same key, other body -> reused
        ("o3", "u", 2, "k1b"),     # new key, but 2 + 2 > limit 2 -> limit_exceeded
        ("o4", "v", 2, None),      # 1 left -> sold_out
        ("o5", "u", 1, "k1"),      # reused again (precedence: reuse before limit)
    ])
    assert res[0][0] == 0 and res[0][1].startswith("o1\t2\t200\t")
    assert [c for c, _ in res[1:]] == [-3, -4, -5, -3]
    replay = await reserve(b, k, [("o9", "u", 2, "k1")])
    assert replay[0][0] == 1 and replay[0][1].split("\n")[1] == "0"  # replay of the 202
    # limit beats stock: u holds 2 of limit 2 on a sale with 1 left
    assert (await reserve(b, k, [("o6", "u", 1, None)]))[0][0] == -4
    # a remembered 409 replays as itself
    assert (await reserve(b, k, [("o7", "w", 2, "kx")]))[0][0] == -5
    again = await reserve(b, k, [("o8", "w", 2, "kx")])
    assert again[0][0] == 1 and again[0][1].split("\n")[1] == "-5"
    assert await b.redis.hget(k.sale, "available") == b"1"
    assert await b.redis.hget(k.sale, "pending") == b"2"
    assert await b.redis.xlen(k.stream) == 1
    assert await b.redis.hget(k.holds, "o1") == b"2:u"


async def test_reserve_inactive_and_replay_after_end(api: Api) -> None:
    b, k = api.backends, keys_of(api)
    now = int(time.time() * 1000)
    await load(b, k, starts_ms=now - 1000, ends_ms=now + 1000)
    assert (await reserve(b, k, [("o1", "u", 1, "k")], now_ms=now))[0][0] == 0
    late = now + 5000
    assert (await reserve(b, k, [("o2", "v", 1, None)], now_ms=late))[0][0] == -2
    assert (await reserve(b, k, [("o3", "u", 1, "k")], now_ms=late))[0][0] == 1  # replay first
    assert (await reserve(b, k, [("o4", "v", 1, None)], now_ms=now - 5000))[0][0] == -2


async def test_release_once(api: Api) -> None:
    b, k = api.backends, keys_of(api)
    rel = [k.sale, k.users, k.holds]
    assert await b.scripts.release(keys=rel, args=["o1", "o2"]) == [-1, -1]  # sale missing
    await load(b, k, stock=3)
    await reserve(b, k, [("o1", "u", 2, None)])
    assert await b.scripts.release(keys=rel, args=["o1"]) == [2]
    assert await b.scripts.release(keys=rel, args=["o1"]) == [0]
    assert await b.redis.hget(k.sale, "available") == b"3"
    assert await b.redis.hget(k.users, "u") is None


async def test_release_a_batch_each_once(api: Api) -> None:
    from redis.exceptions import ResponseError

    b, k = api.backends, keys_of(api)
    rel = [k.sale, k.users, k.holds]
    await load(b, k, stock=10, limit=5)
    await reserve(b, k, [("o1", "u", 2, None), ("o2", "u", 1, None), ("o3", "v", 3, None)])
    assert await b.redis.hget(k.sale, "available") == b"4"
    # o1 twice in one call and an unknown order: each hold returned once
    assert await b.scripts.release(keys=rel, args=["o1", "nope", "o1", "o3"]) == [2, 0, 0, 3]
    assert await b.redis.hget(k.sale, "available") == b"9"
    assert await b.redis.hget(k.users, "u") == b"1"
    assert await b.redis.hget(k.users, "v") is None
    # a malformed hold refuses the whole call before any write
    await b.redis.hset(k.holds, "bad", "garbage")
    try:
        await b.scripts.release(keys=rel, args=["o2", "bad"])
    except ResponseError as exc:
        assert "malformed hold of bad" in str(exc)
    else:
        raise AssertionError("a malformed hold was accepted")
    assert await b.redis.hget(k.sale, "available") == b"9"
    assert await b.redis.hexists(k.holds, "o2")


async def test_ack_once_and_dead_letter_once(api: Api) -> None:
    b, k = api.backends, keys_of(api)
    await load(b, k, stock=5)
    await reserve(b, k, [("o1", "u", 1, None), ("o2", "v", 2, None)])
    entries: Any = await b.redis.xreadgroup(GROUP, "c1", {k.stream: ">"}, count=10)
    (e1, f1), (e2, _f2) = entries[0][1]
    args: list[Any] = [GROUP, e1.decode(), "o1", 1]
    ack = [k.sale, k.pending, k.stream]
    assert int(await b.scripts.ack_persisted(keys=ack, args=args)) == 1
    assert int(await b.scripts.ack_persisted(keys=ack, args=args)) == 0
    assert await b.redis.hget(k.sale, "pending") == b"2"
    dl_keys = [k.sale, k.users, k.holds, k.pending, k.stream, k.dlq]
    dl_args: list[Any] = [GROUP, e2.decode(), "o2", 2, "poison", "raw", 1000]
    assert await b.scripts.dead_letter(keys=dl_keys, args=dl_args) == [1, 2]
    assert await b.scripts.dead_letter(keys=dl_keys, args=dl_args) == [0, 0]
    assert await b.redis.hmget(k.sale, "available", "pending") == [b"4", b"0"]
    assert await b.redis.xlen(k.dlq) == 1 and await b.redis.xlen(k.stream) == 0
    assert f1[b"o"] == b"o1"


async def test_restock_once(api: Api) -> None:
    b, k = api.backends, keys_of(api)
    rk = [k.sale, k.restocks]
    assert int(await b.scripts.restock(keys=rk, args=[1, 5])) == -1
    await load(b, k, stock=1)
    assert int(await b.scripts.restock(keys=rk, args=[1, 5])) == 1
    assert int(await b.scripts.restock(keys=rk, args=[1, 5])) == 0
    assert await b.redis.hmget(k.sale, "stock", "available") == [b"6", b"6"]


async def test_rebuild_only_when_missing_and_counts_every_hold(api: Api) -> None:
    b, k = api.backends, keys_of(api)
    keys = [k.sale, k.users, k.holds, k.pending, k.stream, k.restocks]
    await load(b, k, stock=10, limit=5)
    await reserve(b, k, [("pend", "p", 2, None)])  # pending: only Redis knows it
    await b.redis.hset(k.holds, "gone", "3:g")     # released in PostgreSQL, stale here
    base: list[Any] = [10, 5, 100, 0, 0, 60_000, GROUP]
    args: list[Any] = [*base, 1, "pg1", 4, "q", 1, "gone", 7]
    assert int(await b.scripts.rebuild_sale(keys=keys, args=args)) == 0  # live sale untouched
    await b.redis.delete(k.sale)
    assert int(await b.scripts.rebuild_sale(keys=keys, args=args)) == 1
    # holds = pg1 (4) + pend (2); "gone" was released -> available 4, pending 2
    assert await b.redis.hmget(k.sale, "available", "pending", "stock") == [b"4", b"2", b"10"]
    assert await b.redis.hgetall(k.users) == {b"q": b"4", b"p": b"2"}
    assert await b.redis.smembers(k.restocks) == {b"7"}
    await b.redis.delete(k.sale)
    over: list[Any] = [*base, 1, "big", 11, "z", 0]
    try:
        await b.scripts.rebuild_sale(keys=keys, args=over)
    except Exception as exc:
        assert "holds exceed stock" in str(exc)
    else:
        raise AssertionError("rebuild accepted holds above stock")
    assert await b.redis.exists(k.sale) == 0


async def test_publish_events_in_order_and_all_or_nothing(api: Api) -> None:
    from redis.exceptions import ResponseError

    from flashsale import events

    b = api.backends
    key = events.stream_key(b.settings.key_prefix)
    added = await b.scripts.publish_events(
        keys=[key], args=[1000, 2, "type", "a", "order_id", "o1", 1, "type", "b"]
    )
    assert added == 2
    entries: Any = await b.redis.xrange(key)
    got = [f for _id, f in entries]
    assert got == [{b"type": b"a", b"order_id": b"o1"}, {b"type": b"b"}]
    bad_lists: list[list[Any]] = [
        [0, 1, "type", "a"],                       # bad maxlen
        [1000, 1, "type", "a", 2, "type", "b"],    # second event short of a pair
        [1000, "x", "type", "a"],                  # count not a number
        [1000, 0],                                 # empty event
        [1000, 1.5, "type", "a", "b"],             # fractional count
    ]
    for bad in bad_lists:
        try:
            await b.scripts.publish_events(keys=[key], args=bad)
        except ResponseError as exc:
            assert "bad" in str(exc)
        else:
            raise AssertionError(f"accepted {bad}")
    assert await b.redis.xlen(key) == 2  # nothing of a refused call was written
    n = await events.publish(b, [events.DomainEvent("order_paid", "o2", "s1", {"amount": 5})])
    assert n == 1
    newest: Any = await b.redis.xrevrange(key, count=1)
    last = newest[0][1]
    assert last[b"type"] == b"order_paid" and last[b"amount"] == b"5"
    assert set(last) == {b"type", b"order_id", b"sale_id", b"at_ms", b"amount"}
