"""The consumer under PostgreSQL trouble and a lost consumer group.

* An entry one consumer committed (and has not acked yet) is reclaimed by
  another consumer that cannot write to PostgreSQL at the moment: it must
  end acked as persisted, never dead-lettered with its hold returned.
* PostgreSQL busy (statements cancelled behind a table lock, backends
  terminated, connections refused: too many for the role) for much longer
  than ``consumer_max_deliveries`` x ``consumer_claim_idle_ms``: nothing is
  dead-lettered, the delivery counts do not climb, everything is persisted
  once the database recovers.
* A sale's stream deleted (its group with it) and recreated by ``XADD``
  without the group: the consumer recreates the group, says so (a warning
  naming the sale, ``flashsale_consumer_group_recreated_total``), and the
  other sales' orders are persisted meanwhile, without a reconcile.

The PostgreSQL faults hit a role of their own (created for the test, with
``statement_timeout`` and ``CONNECTION LIMIT`` on it) in a fresh database,
so nothing else on the shared server is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from flashsale.core import record
from flashsale.core.backends import Backends, open_backends
from flashsale.core.deduct import persist_batch
from flashsale.core.persist import Persister
from flashsale.ops.metrics import Metrics
from tests.chaos.harness import audit
from tests.support import (
    Api,
    eventually,
    fresh_database,
    poison_order,
    running_app,
    test_settings,
)

CLAIM_IDLE_MS = 200
ORDERS = 10
MAX_DELIVERIES = 2
STATEMENT_TIMEOUT_MS = 100


def _counter(m: Metrics, name: str) -> float:
    found = re.search(rb"^" + name.encode() + rb" (\S+)$", m.render(), re.M)
    assert found, f"{name} missing from the metrics"
    return float(found.group(1))


def _as_role(dsn: str, role: str, password: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}"))


@contextlib.asynccontextmanager
async def _busy_lab(
    server_urls: tuple[str, str], redis_url: str, max_deliveries: int = MAX_DELIVERIES
) -> AsyncIterator[tuple[Api, Backends, str, asyncpg.Connection]]:
    """A fresh database, the app on it (as the admin), the consumer's backends
    as a role of its own whose statements PostgreSQL cancels after
    STATEMENT_TIMEOUT_MS, and an admin connection to make trouble with."""
    role = "fs_busy_" + secrets.token_hex(4)
    password = secrets.token_hex(16)  # the embedded PostgreSQL asks for one (scram)
    async with fresh_database(server_urls[1], "flashsale_faults") as dsn:
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(
                f"CREATE ROLE {role} LOGIN PASSWORD '{password}'; "
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; "
                f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}; "
                f"ALTER ROLE {role} SET statement_timeout = '{STATEMENT_TIMEOUT_MS}ms'"
            )
            settings = test_settings(
                redis_url, dsn, consumer_claim_idle_ms=CLAIM_IDLE_MS,
                consumer_max_deliveries=max_deliveries, pg_pool_min=1, pg_pool_max=4,
            )
            consumer_settings = replace(settings, database_url=_as_role(dsn, role, password))
            async with running_app(settings) as api, open_backends(consumer_settings) as b:
                yield api, b, role, admin
        finally:
            await admin.execute(f"DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}")
            await admin.close()


@contextlib.asynccontextmanager
async def _orders_locked(admin: asyncpg.Connection) -> AsyncIterator[None]:
    """Inserts into orders wait behind this lock until their statement_timeout
    cancels them (QueryCanceledError): PostgreSQL busy, not refusing a row."""
    tx = admin.transaction()
    await tx.start()
    try:
        await admin.execute("LOCK TABLE orders IN SHARE MODE")
        yield
    finally:
        await tx.rollback()


async def _terminate(admin: asyncpg.Connection, role: str) -> int:
    """Kill the role's backends (AdminShutdownError / connection lost on their next use)."""
    n = await admin.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1", role
    )
    return int(n)


async def _run_for(persister: Persister, seconds: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(persister.run(stop))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(task, 30)


async def _max_delivered(b: Backends, sale_id: str) -> int:
    info: Any = await b.redis.xpending_range(
        b.keys(sale_id).stream, b.settings.consumer_group, min="-", max="+", count=10_000
    )
    return max((int(p["times_delivered"]) for p in info), default=0)


async def test_entry_committed_by_another_consumer_is_acked_not_dead_lettered(
    server_urls: tuple[str, str], redis_url: str
) -> None:
    """Consumer "alpha" read [order, poison], its batch failed (the poison
    breaks a CHECK), it committed the order alone and stalls before the ack.
    Consumer "beta" reclaims both while PostgreSQL cancels its statements (a
    lock on orders): its batch fails, then each entry alone fails. The order
    must not be dead-lettered (PostgreSQL has it, the unit is sold); once the
    lock is gone it is acked as persisted with its hold kept, and only the
    poison, which PostgreSQL refuses on its own, is dead-lettered."""
    async with _busy_lab(server_urls, redis_url) as (api, b, _role, admin):
        s = b.settings
        sid = (await api.create_sale(stock=3, per_user_limit=2))["sale_id"]
        status, body = await api.reserve(sid, "alice", 2, key="k-1")
        assert status == 202, body
        poison = await poison_order(api.backends, sid)  # CHECK refuses it
        k = b.keys(sid)
        got: Any = await b.redis.xreadgroup(s.consumer_group, "alpha", {k.stream: ">"})
        (eid, fields), _poison_item = got[0][1]
        entry = record.from_entry(sid, eid.decode(), fields)
        async with api.backends.pg.acquire() as conn:  # alpha's one-by-one commit, no ack
            assert await persist_batch(conn, [entry], "alpha") == []

        m = Metrics()
        beta = Persister(b, m, name="beta")
        async with _orders_locked(admin):
            await asyncio.sleep(CLAIM_IDLE_MS / 1000 * 1.5)
            await _run_for(beta, MAX_DELIVERIES * CLAIM_IDLE_MS / 1000 * 5)
            during = await audit(api.backends, sid)
            delivered = await _max_delivered(b, sid)
        assert during.dead_lettered == [], "dead-lettered while PostgreSQL was only busy"
        assert _counter(m, "flashsale_consumer_errors_total") > 0, "the fault did not bite"

        async def settled() -> bool:
            return len((await audit(api.backends, sid)).dead_lettered) == 1 and (
                await audit(api.backends, sid)
            ).drained

        stop = asyncio.Event()
        task = asyncio.create_task(beta.run(stop))
        try:
            await eventually(settled, timeout_s=20)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        a = await audit(api.backends, sid)
    print(f"\ncommitted elsewhere: max delivery count during the fault {delivered}, "
          f"rows {a.rows}, dead letters {a.dead_lettered}")
    assert delivered <= MAX_DELIVERIES, "busy rounds counted as deliveries"
    assert a.dead_lettered == [poison.order_id]
    assert a.rows[entry.order_id] == ("awaiting_payment", 2)
    assert a.sold == 2 and a.holds == 1, "the committed order's hold was returned"
    assert a.available == 1
    assert a.drained
    assert a.ledger["consistent"] is True, a.ledger


async def test_one_by_one_never_dead_letters_an_order_committed_meanwhile(
    server_urls: tuple[str, str], redis_url: str
) -> None:
    """The one-by-one path itself, with consumer_max_deliveries = 1: "beta"
    holds [order, poison]; "alpha" (which reclaimed them while beta stalled)
    commits the order; beta's batch then fails and so does the order alone,
    because PostgreSQL cancels beta's statements (a lock on orders). That is
    PostgreSQL busy, not a refusal of the order: it must stay pending (and
    then be acked as persisted), never be dead-lettered with its hold
    returned."""
    async with _busy_lab(server_urls, redis_url, max_deliveries=1) as (api, b, _role, admin):
        s = b.settings
        sid = (await api.create_sale(stock=3, per_user_limit=2))["sale_id"]
        status, body = await api.reserve(sid, "alice", 2, key="k-1")
        assert status == 202, body
        poison = await poison_order(api.backends, sid)  # CHECK refuses it
        k = b.keys(sid)
        beta = Persister(b, Metrics(), name="beta")
        await beta._refresh_streams()  # beta knows the sale's stream ...
        got: Any = await b.redis.xreadgroup(s.consumer_group, "beta", {k.stream: ">"})
        batch = [(k.stream, eid.decode(), f) for eid, f in got[0][1]]  # ... and holds both
        entry = record.from_entry(sid, batch[0][1], batch[0][2])
        assert entry.order_id == body["order_id"]
        async with api.backends.pg.acquire() as conn:  # alpha's commit
            await persist_batch(conn, [entry], "alpha")
        raised: BaseException | None = None
        async with _orders_locked(admin):
            try:
                await beta.handle(batch)  # beta's batch fails, then one by one
            except Exception as exc:  # PostgreSQL busy: the delivery fails as a whole
                raised = exc
            during = await audit(api.backends, sid)
        assert during.dead_lettered == [], f"dead-lettered while PostgreSQL was busy ({raised!r})"
        assert isinstance(raised, asyncpg.QueryCanceledError), raised
        await beta.handle(batch)  # the lock is gone: the order acked, the poison refused
        a = await audit(api.backends, sid)
    assert a.dead_lettered == [poison.order_id]
    assert a.rows[entry.order_id] == ("awaiting_payment", 2)
    assert a.holds == 1 and a.available == 1, "the committed order's hold was returned"
    assert a.drained
    assert a.ledger["consistent"] is True, a.ledger


async def test_postgres_busy_longer_than_max_deliveries_dead_letters_nothing(
    server_urls: tuple[str, str], redis_url: str
) -> None:
    """A backlog meets PostgreSQL busy for ~40 claim idles (15 times
    MAX_DELIVERIES x claim idle): first statements cancelled behind a lock,
    then the consumers' backends terminated, then no connection at all
    (too many connections for the role). Nothing is dead-lettered or failed,
    and every order is persisted after the recovery."""
    async with _busy_lab(server_urls, redis_url) as (api, b, role, admin):
        sid = (await api.create_sale(stock=100, per_user_limit=1))["sale_id"]
        orders = set()
        for i in range(ORDERS):
            status, body = await api.reserve(sid, f"buyer-{i}", 1, key=f"k-{i}")
            assert status == 202, body
            orders.add(body["order_id"])
        m = Metrics()
        consumers = [Persister(b, m, name=f"busy-{i}") for i in range(2)]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(c.run(stop)) for c in consumers]
        fault_s = MAX_DELIVERIES * CLAIM_IDLE_MS / 1000 * 15  # 6 s
        delivered = []
        started = time.monotonic()
        try:
            async with _orders_locked(admin):  # QueryCanceledError, then AdminShutdownError
                for pause_s in (0.4, 0.2, 0.1, 0.1, 0.1):
                    await asyncio.sleep(fault_s * pause_s)
                    delivered.append(await _max_delivered(b, sid))
                await _terminate(admin, role)
                await asyncio.sleep(fault_s * 0.1)
            await admin.execute(f"ALTER ROLE {role} CONNECTION LIMIT 0")
            await _terminate(admin, role)  # TooManyConnectionsError on every reconnect
            await asyncio.sleep(fault_s * 0.3)
            delivered.append(await _max_delivered(b, sid))
            during = await audit(api.backends, sid)
            await admin.execute(f"ALTER ROLE {role} CONNECTION LIMIT -1")
            healed = time.monotonic()

            async def persisted() -> bool:
                return (await audit(api.backends, sid)).drained

            await eventually(persisted, timeout_s=30)
            drain_s = time.monotonic() - healed
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
        a = await audit(api.backends, sid)
    errors = _counter(m, "flashsale_consumer_errors_total")
    print(f"\npostgres busy {healed - started:.1f}s: max delivery counts {delivered}, "
          f"consumer errors {errors:.0f}, drained {drain_s:.2f}s after recovery")
    assert during.dead_lettered == [] and during.status_counts().get("failed", 0) == 0
    assert errors > 0, "the faults did not bite"
    assert max(delivered) <= MAX_DELIVERIES, f"busy rounds counted as deliveries: {delivered}"
    assert a.dead_lettered == []
    assert a.rows == {o: ("awaiting_payment", 1) for o in orders}
    assert a.sold == ORDERS and a.available == 100 - ORDERS and a.holds == ORDERS
    assert a.drained
    assert a.ledger["consistent"] is True, a.ledger


async def test_lost_consumer_group_is_recreated_and_blocks_no_other_sale(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """Three sales: ``lost``'s stream is deleted and recreated by the next
    reservation (no group), ``gone``'s is deleted and stays away, ``other``
    is left alone. The one read of all streams answers NOGROUP for all."""
    b = api.backends
    lost = (await api.create_sale(stock=10, per_user_limit=5))["sale_id"]
    other = (await api.create_sale(stock=10, per_user_limit=5))["sale_id"]
    gone = (await api.create_sale(stock=10, per_user_limit=5))["sale_id"]
    m = Metrics()
    consumer = Persister(b, m, name="solo")
    first = set()
    for sid in (lost, other, gone):
        status, body = await api.reserve(sid, "first", 1, key=f"{sid}-0")
        assert status == 202, body
        first.add(body["order_id"])

    async def persisted(ids: set[str]) -> bool:
        await consumer.step()
        n = await b.pg.fetchval(
            "SELECT count(*) FROM orders WHERE order_id = ANY($1::text[])", list(ids)
        )
        return int(n) == len(ids)

    await eventually(lambda: persisted(first), timeout_s=10)
    # the stream key goes (deleted, evicted): its group with it; the next
    # reservation's XADD recreates the stream without any group
    assert await b.redis.delete(b.keys(lost).stream, b.keys(gone).stream) == 2
    later = set()
    for sid in (lost, other):
        for i in range(1, 3):
            status, body = await api.reserve(sid, f"buyer-{i}", 1, key=f"{sid}-{i}")
            assert status == 202, body
            later.add(body["order_id"])
    groups: Any = await b.redis.xinfo_groups(b.keys(lost).stream)
    assert groups == []
    with caplog.at_level(logging.WARNING, logger="flashsale.core.persist"):
        await eventually(lambda: persisted(later), timeout_s=10)
    for sid in (lost, other, gone):
        a = await audit(b, sid)
        assert a.drained, (sid, a)
        assert a.ledger["consistent"] is True, a.ledger
    assert _counter(m, "flashsale_consumer_group_recreated_total") == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(lost in msg and "group" in msg for msg in warned), warned
    assert not any(other in msg or gone in msg for msg in warned), warned
