"""Each Lua script alone, through the one loader: every return code."""

from __future__ import annotations

import time
from typing import Any

from redis.commands.core import AsyncScript

from flashsale.core.backends import Backends
from flashsale.core.keys import SaleKeys
from flashsale.core.outcomes import fingerprint
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
    keys = [k.sale, k.users, k.holds, k.pending, k.stream, k.void, k.room_used, k.room_admitted]
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


async def test_ack_trims_the_stream_by_id_never_an_unacked_entry(api: Api) -> None:
    """ack_persisted trims by id (one XTRIM MINID per call): below the oldest entry
    still pending, or up to the last delivered one when none is pending. Entries
    acked out of order wait above a pending one; an undelivered entry stays."""
    b, k = api.backends, keys_of(api)
    await load(b, k, stock=10, limit=5)
    await reserve(b, k, [(f"o{i}", f"u{i}", 1, None) for i in range(1, 6)])
    ack = [k.sale, k.pending, k.stream]
    c1: Any = await b.redis.xreadgroup(GROUP, "c1", {k.stream: ">"}, count=2)
    c2: Any = await b.redis.xreadgroup(GROUP, "c2", {k.stream: ">"}, count=2)
    (e1, _), (e2, _) = c1[0][1]
    (e3, _), (e4, _) = c2[0][1]

    async def acked(*pairs: tuple[bytes, str]) -> int:
        args: list[Any] = [GROUP]
        for entry_id, order_id in pairs:
            args += [entry_id.decode(), order_id, 1]
        return int(await b.scripts.ack_persisted(keys=ack, args=args))

    assert await acked((e3, "o3"), (e4, "o4")) == 2  # c1's e1, e2 still pending below
    assert await b.redis.xlen(k.stream) == 5
    assert await acked((e1, "o1")) == 1  # e1 trimmed; e2 pending, e3 and e4 wait above it
    rest: Any = await b.redis.xrange(k.stream)
    ids = [e for e, _ in rest]
    assert ids[0] == e2 and len(ids) == 4
    assert await acked((e2, "o2")) == 1  # none pending: up to the last delivered (e4)
    left: Any = await b.redis.xrange(k.stream)
    assert len(left) == 1 and left[0][1][b"o"] == b"o5"  # delivered to nobody: kept
    assert await acked((e2, "o2")) == 0  # acked twice: nothing more
    assert await b.redis.xlen(k.stream) == 1
    c3: Any = await b.redis.xreadgroup(GROUP, "c1", {k.stream: ">"}, count=5)
    (e5, _), = c3[0][1]
    assert await acked((e5, "o5")) == 1
    assert await b.redis.xlen(k.stream) == 0
    assert await b.redis.hget(k.sale, "pending") == b"0"
    assert await b.redis.hlen(k.pending) == 0


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
    base: list[Any] = [10, 5, 100, 0, 0, 60_000, GROUP, "0-0"]
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


async def test_rebuild_over_a_sale_whose_stream_is_behind_the_watermark(api: Api) -> None:
    """Redis lost writes PostgreSQL has (the stream was last generated below the
    last entry PostgreSQL persisted): the live sale is rebuilt (answer 2) and
    the stream's last id raised to the watermark, so it is not behind again."""
    b, k = api.backends, keys_of(api)
    keys = [k.sale, k.users, k.holds, k.pending, k.stream, k.restocks]
    await load(b, k, stock=10, limit=5)
    await reserve(b, k, [("pend", "p", 2, None)])
    info: Any = await b.redis.xinfo_stream(k.stream)
    last = info["last-generated-id"].decode()
    ms = int(last.split("-")[0])
    base: list[Any] = [10, 5, 100, 0, 0, 60_000, GROUP]
    holds: list[Any] = [1, "pg1", 3, "q", 0]  # an order Redis lost, PostgreSQL has
    assert int(await b.scripts.rebuild_sale(keys=keys, args=[*base, last, *holds])) == 0
    assert int(await b.scripts.rebuild_sale(keys=keys, args=[*base, "0-0", *holds])) == 0
    ahead = f"{ms + 5000}-3"
    assert int(await b.scripts.rebuild_sale(keys=keys, args=[*base, ahead, *holds])) == 2
    assert await b.redis.hmget(k.sale, "available", "pending") == [b"5", b"2"]
    assert await b.redis.hgetall(k.users) == {b"q": b"3", b"p": b"2"}
    info = await b.redis.xinfo_stream(k.stream)
    assert info["last-generated-id"] == ahead.encode()
    assert int(await b.scripts.rebuild_sale(keys=keys, args=[*base, ahead, *holds])) == 0
    # new entries sort after every persisted one
    await reserve(b, k, [("next", "n", 1, None)])
    newest: Any = await b.redis.xrevrange(k.stream, count=1)
    assert tuple(int(x) for x in newest[0][0].decode().split("-")) > (ms + 5000, 3)
    # the sale missing and the stream gone: rebuilt, group created, id raised
    await b.redis.delete(k.sale, k.stream)
    assert int(await b.scripts.rebuild_sale(keys=keys, args=[*base, ahead, *holds])) == 1
    info = await b.redis.xinfo_stream(k.stream)
    assert info["last-generated-id"] == ahead.encode() and info["groups"] == 1


async def test_publish_events_in_order_and_all_or_nothing(api: Api) -> None:
    from redis.exceptions import ResponseError

    from flashsale.core import events

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


# -- checks first, writes last: a call refused half-way leaves NOTHING written ----------


async def dump(b: Backends, names: list[str]) -> dict[str, bytes | None]:
    """Every key's serialized value (DUMP: fields, stream entries, groups and their
    pending entries), to compare the whole state before and after a call."""
    return {n: await b.redis.dump(n) for n in names}


async def refused_unchanged(b: Backends, k: SaleKeys, script: AsyncScript, keys: list[str],
                            args: list[Any], match: str, extra: tuple[str, ...] = ()) -> None:
    import re

    from redis.exceptions import ResponseError

    names = [*k.all_sale_keys(), *extra]
    before = await dump(b, names)
    assert before == await dump(b, names)  # the dump itself is stable
    error: str | None = None
    try:
        await script(keys=keys, args=args)
    except ResponseError as exc:
        error = str(exc)
    changed = sorted(n for n, v in (await dump(b, names)).items() if v != before[n])
    assert not changed, f"the call (error {error!r}) left writes behind in {changed}"
    assert error is not None and re.search(match, error), f"accepted, or error {error!r}"


async def _pending_entry(b: Backends, k: SaleKeys, order_id: str, user: str, qty: int) -> str:
    """Reserve one order and deliver its entry to a consumer: (entry id)."""
    await reserve(b, k, [(order_id, user, qty, None)])
    entries: Any = await b.redis.xreadgroup(GROUP, "c1", {k.stream: ">"}, count=10)
    return str(entries[0][1][-1][0].decode())


DL_CASES = {
    "malformed hold": ("hold", "garbage", "2", 1000, "malformed hold"),
    "hold quantity not an integer": ("hold", "x:u", "2", 1000, "malformed hold"),
    "unreadable quantity": ("none", "", "x", 1000, "bad quantity"),
    "held count not an integer": ("users", "lots", "2", 1000, "not an integer"),
    "bad dead-letter max length": ("none", "", "2", "many", "bad max length"),
    "dead-letter key not a stream": ("dlq", "", "2", 1000, "dead-letter key"),
}


async def test_dead_letter_checks_before_it_writes(api: Api) -> None:
    """The old script acked the entry first, then parsed the hold: an error left
    the entry acked (never redelivered) and its hold never returned."""
    b = api.backends
    for i, (case, (what, value, qty, maxlen, match)) in enumerate(DL_CASES.items()):
        k = keys_of(api, f"sl_dlcheck{i:05d}")
        await load(b, k, stock=5)
        entry_id = await _pending_entry(b, k, "o1", "u", 2)
        if what == "hold":
            await b.redis.hset(k.holds, "o1", value)
        elif what == "users":
            await b.redis.hset(k.users, "u", value)
        elif what == "dlq":
            await b.redis.set(k.dlq, "not a stream")
        args: list[Any] = [GROUP, entry_id, "o1", qty, "poison", "raw", maxlen]
        dl_keys = [k.sale, k.users, k.holds, k.pending, k.stream, k.dlq]
        try:
            await refused_unchanged(
                b, k, b.scripts.dead_letter, dl_keys, args, match
            )
        except BaseException as exc:
            raise AssertionError(f"case {case!r}: {exc!r}") from exc


async def test_dead_letter_of_an_entry_not_pending_is_a_no_op(api: Api) -> None:
    b, k = api.backends, keys_of(api)
    dl_keys = [k.sale, k.users, k.holds, k.pending, k.stream, k.dlq]
    args: list[Any] = [GROUP, "1-1", "o1", 1, "poison", "raw", 1000]
    assert await b.scripts.dead_letter(keys=dl_keys, args=args) == [0, 0]  # no stream
    await load(b, k, stock=5)
    assert await b.scripts.dead_letter(keys=dl_keys, args=args) == [0, 0]  # not pending
    other = [*args]
    other[0] = "nogroup"
    assert await b.scripts.dead_letter(keys=dl_keys, args=other) == [0, 0]  # no such group
    assert await b.redis.xlen(k.dlq) == 0


async def test_load_sale_checks_before_it_writes(api: Api) -> None:
    """The old script wrote the sale, then XGROUP CREATE could fail (the stream key
    of another type), leaving a sale without its group; bad numbers were stored."""
    b = api.backends
    cases: list[tuple[str, list[Any], str]] = [
        ("stream key not a stream", [3, 2, 100, 0, 0, 60_000, GROUP], "stream key"),
        ("stock not an integer", ["x", 2, 100, 0, 0, 60_000, GROUP], "bad arguments"),
        ("limit below 1", [3, 0, 100, 0, 0, 60_000, GROUP], "bad arguments"),
        ("hold not an integer", [3, 2, 100, 0, 0, "1.5", GROUP], "bad arguments"),
        ("no group name", [3, 2, 100, 0, 0, 60_000, ""], "bad arguments"),
    ]
    for i, (case, args, match) in enumerate(cases):
        k = keys_of(api, f"sl_ldcheck{i:05d}")
        if case == "stream key not a stream":
            await b.redis.set(k.stream, "x")
        try:
            await refused_unchanged(
                b, k, b.scripts.load_sale, [k.sale, k.stream, k.restocks], args, match
            )
        except BaseException as exc:
            raise AssertionError(f"case {case!r}: {exc!r}") from exc
    # a stream that exists with its group already (the sale hash lost alone): loads
    k = keys_of(api, "sl_ldcheckok001")
    await b.redis.xgroup_create(k.stream, GROUP, id="0", mkstream=True)
    assert await load(b, k) == 1
    assert [g["name"] for g in await b.redis.xinfo_groups(k.stream)] == [GROUP.encode()]


async def test_rebuild_sale_checks_before_it_writes(api: Api) -> None:
    """The old script deleted and rewrote users/holds/sale, then XGROUP CREATE
    could fail; bad numbers were stored as they came."""
    b = api.backends
    base: list[Any] = [10, 5, 100, 0, 0, 60_000, GROUP, "0-0"]
    cases: list[tuple[str, list[Any], str]] = [
        ("stream key not a stream", [*base, 1, "pg1", 4, "q", 0], "stream key"),
        ("limit not an integer", [10, "x", 100, 0, 0, 60_000, GROUP, "0-0", 1, "pg1", 4, "q", 0],
         "bad arguments"),
        ("hold quantity not an integer", [*base, 1, "pg1", "4.5", "q", 0], "bad hold"),
        ("short hold list", [*base, 2, "pg1", 4, "q", 0], "bad"),
        ("bad watermark", [*base[:7], "12", 0, 0], "bad arguments"),
        ("malformed hold in Redis", [*base, 0, 0], "malformed hold"),
        ("malformed pending record", [*base, 0, 0], "malformed pending"),
    ]
    for i, (case, args, match) in enumerate(cases):
        k = keys_of(api, f"sl_rbcheck{i:05d}")
        await load(b, k, stock=10, limit=5)
        await reserve(b, k, [("pend", "p", 2, None)])
        await b.redis.delete(k.sale)
        if case == "stream key not a stream":
            await b.redis.delete(k.stream)
            await b.redis.set(k.stream, "x")
        elif case == "malformed hold in Redis":
            await b.redis.hset(k.holds, "bad", "garbage")
        elif case == "malformed pending record":
            await b.redis.hset(k.pending, "bad", "no tabs here")
        keys = [k.sale, k.users, k.holds, k.pending, k.stream, k.restocks]
        try:
            await refused_unchanged(
                b, k, b.scripts.rebuild_sale, keys, args, match
            )
        except BaseException as exc:
            raise AssertionError(f"case {case!r}: {exc!r}") from exc


async def test_release_checks_before_it_writes(api: Api) -> None:
    """The old script removed the hold, then HINCRBY on a held count that is not
    an integer failed: the hold gone, its stock never returned."""
    b = api.backends
    cases = {
        "held count not an integer": ("users", "u", "lots", "not an integer"),
        "available not an integer": ("sale", "available", "lots", "not an integer"),
        "hold quantity fractional": ("holds", "o1", "1.5:u", "malformed hold"),
    }
    for i, (case, (what, field_, value, match)) in enumerate(cases.items()):
        k = keys_of(api, f"sl_rlcheck{i:05d}")
        await load(b, k, stock=5)
        await reserve(b, k, [("o1", "u", 2, None)])
        await b.redis.hset(getattr(k, what), field_, value)
        rel = [k.sale, k.users, k.holds]
        try:
            await refused_unchanged(
                b, k, b.scripts.release, rel, ["o1"], match
            )
        except BaseException as exc:
            raise AssertionError(f"case {case!r}: {exc!r}") from exc


async def test_restock_checks_before_it_writes(api: Api) -> None:
    """The old script recorded the restock id as applied, then HINCRBY failed:
    the restock was never added, and never would be (its id is taken)."""
    b = api.backends
    cases: list[tuple[str, list[Any], str]] = [
        ("quantity not an integer", [1, "x"], "bad arguments"),
        ("quantity fractional", [1, "2.5"], "bad arguments"),
        ("stock not an integer", [1, 5], "not an integer"),
        ("restock id empty", ["", 5], "bad arguments"),
    ]
    for i, (case, args, match) in enumerate(cases):
        k = keys_of(api, f"sl_rscheck{i:05d}")
        await load(b, k, stock=1)
        if case == "stock not an integer":
            await b.redis.hset(k.sale, "stock", "lots")
        try:
            await refused_unchanged(
                b, k, b.scripts.restock, [k.sale, k.restocks], args, match
            )
        except BaseException as exc:
            raise AssertionError(f"case {case!r}: {exc!r}") from exc


async def test_ack_persisted_checks_before_it_writes(api: Api) -> None:
    """The old script acked and deleted the entry, then `-qty` of an unreadable
    quantity (or a pending counter that is not an integer) failed half-way."""
    b = api.backends
    cases = ["quantity not an integer", "pending not an integer", "bad entry id",
             "short triple"]
    for i, case in enumerate(cases):
        k = keys_of(api, f"sl_akcheck{i:05d}")
        await load(b, k, stock=5)
        e1 = await _pending_entry(b, k, "o1", "u", 1)
        args: list[Any] = [GROUP, e1, "o1", 1]
        if case == "quantity not an integer":
            args = [GROUP, e1, "o1", "x"]
        elif case == "pending not an integer":
            await b.redis.hset(k.sale, "pending", "lots")
        elif case == "bad entry id":
            args = [GROUP, e1, "o1", 1, "not-an-id", "o2", 1]
        elif case == "short triple":
            args = [GROUP, e1, "o1", 1, "1-1", "o2"]
        match = "not an integer" if case == "pending not an integer" else "bad"
        ack = [k.sale, k.pending, k.stream]
        try:
            await refused_unchanged(
                b, k, b.scripts.ack_persisted, ack, args, match
            )
        except BaseException as exc:
            raise AssertionError(f"case {case!r}: {exc!r}") from exc


async def test_publish_events_checks_before_it_writes(api: Api) -> None:
    from flashsale.core import events

    b, k = api.backends, keys_of(api)
    key = events.stream_key(b.settings.key_prefix)
    await b.scripts.publish_events(keys=[key], args=[1000, 1, "type", "a"])
    for bad in ([1.5, 1, "type", "a"], ["many", 1, "type", "a"]):
        await refused_unchanged(
            b, k, b.scripts.publish_events, [key], bad, "bad maxlen", extra=(key,)
        )
