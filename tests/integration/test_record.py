"""The accepted order's one record (flashsale/core/record.py), through the real
script: the same string in the stream entry and the pending hash, one parse
for each reader, and a stream entry written before the record still persisted."""

from __future__ import annotations

from typing import Any

from flashsale.core import record
from tests.support import Api


async def test_one_record_in_the_stream_and_the_pending_hash(api: Api) -> None:
    b = api.backends
    sid = (await api.create_sale(stock=5, price_cents=250, per_user_limit=2))["sale_id"]
    status, body = await api.reserve(sid, "rec-buyer", 2, key="rec-key-1")
    assert status == 202, body
    k = b.keys(sid)
    entries: Any = await b.redis.xrange(k.stream)
    [(entry_id, fields)] = entries
    pending: Any = await b.redis.hget(k.pending, body["order_id"])
    assert set(fields) == {b"o", b"r"}
    assert fields[b"o"].decode() == body["order_id"] and fields[b"r"] == pending

    from_stream = record.from_entry(sid, entry_id.decode(), fields)
    from_pending = record.from_record(sid, body["order_id"], pending)
    assert from_stream == from_pending._replace(entry_id=entry_id.decode())
    assert from_stream.body() == body
    assert (from_stream.user_id, from_stream.quantity, from_stream.amount_cents) == (
        "rec-buyer", 2, 500)
    assert from_stream.idempotency_key == "rec-key-1"
    assert from_stream.created_ms == record.created_ms_of(body["order_id"])

    # the key's record keeps the acceptance, as before the record existed
    raw: Any = await b.redis.get(k.idempotency("rec-buyer", "rec-key-1"))
    _fp, code, acceptance = raw.decode().split("\n", 2)
    assert code == "0"
    assert record.from_acceptance(sid, "rec-buyer", "rec-key-1", from_stream.created_ms,
                                  acceptance) == from_pending

    await api.drain(sid)
    row = await b.pg.fetchrow("SELECT * FROM orders WHERE order_id = $1", body["order_id"])
    assert row is not None and row["status"] == "awaiting_payment"
    assert (row["user_id"], row["quantity"], row["amount_cents"], row["idempotency_key"]) == (
        "rec-buyer", 2, 500, "rec-key-1")


async def test_a_stream_entry_from_before_the_record_is_persisted(api: Api) -> None:
    """An upgrade: entries the previous script wrote (fields o u q a e c k) are read."""
    b = api.backends
    sid = (await api.create_sale(stock=5, price_cents=300))["sale_id"]
    status, body = await api.reserve(sid, "old-buyer", 1)
    assert status == 202, body
    k = b.keys(sid)
    entries: Any = await b.redis.xrange(k.stream)
    [(entry_id, fields)] = entries
    o = record.from_entry(sid, entry_id.decode(), fields)
    await b.redis.xdel(k.stream, entry_id)  # as if the previous script had written it:
    await b.redis.xadd(k.stream, {
        "o": o.order_id, "u": o.user_id, "q": o.quantity, "a": o.amount_cents,
        "e": o.expires_ms, "c": o.created_ms, "k": "",
    })
    legacy: Any = await b.redis.xrange(k.stream)
    [(legacy_id, legacy_fields)] = legacy
    assert record.from_entry(sid, legacy_id.decode(), legacy_fields) == o._replace(
        entry_id=legacy_id.decode())
    assert record.quantity_of(legacy_fields) == 1 == record.quantity_of(fields)
    await api.drain(sid)
    row = await b.pg.fetchrow("SELECT status, quantity FROM orders WHERE order_id = $1",
                              o.order_id)
    assert row is not None and (row["status"], row["quantity"]) == ("awaiting_payment", 1)
    assert await b.redis.hlen(k.pending) == 0
    assert (await api.ledger(sid))["consistent"]
