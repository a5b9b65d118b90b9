"""kill -9 of the stream consumer under load, at least 20 times.

The consumer runs as a child (``python -m flashsale consume``) whose
PostgreSQL link goes through a TcpProxy adding 20 ms to every reply, so a
batch spends a real while inside its transaction and between COMMIT and the
ack: random kills land before the commit (mid-batch) and after the commit
but before the ack. Each kill is classified from what the dead consumer left
in the group's pending list. The loop runs at least 20 cycles and until both
kill points were hit (at most 40). Then a last consumer drains everything.

Guarantees checked: accepted (unique 202 order ids) = persisted rows +
compensations, no order both, no duplicate, ``sold`` = held quantity, the
pending list empty after reclaim, the ledger consistent.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import pytest

from flashsale.config import Settings
from flashsale.core import dead_letters, record
from flashsale.core.backends import Backends
from flashsale.core.deduct import persist_batch
from flashsale.core.outcomes import Accepted
from flashsale.core.persist import Persister
from flashsale.core.reserve import Reserver
from flashsale.ops.metrics import Metrics
from tests.chaos.conftest import Figures
from tests.chaos.faults import TcpProxy
from tests.chaos.harness import (
    HOLDING,
    LoadGenerator,
    Services,
    audit,
    consumer_joined,
    flashsale_env,
    unacked,
    wait_drained,
)
from tests.support import eventually, running_app

CYCLES_MIN = 20
CYCLES_MAX = 40
STARTUP_KILL_EVERY = 5  # every 5th cycle kills the consumer while it starts
RATE_PER_S = 150
STOCK = 100_000
PG_REPLY_DELAY_MS = 20

pytestmark = pytest.mark.chaos


async def _in_flight(b: Backends, sale_id: str, consumers: list[str]) -> dict[str, str]:
    """Entry id -> order id of what ``consumers`` (one process's) had delivered and not acked."""
    k = b.keys(sale_id)
    out: dict[str, str] = {}
    for p in await unacked(b, sale_id, consumers):
        eid = p["message_id"].decode()
        got: Any = await b.redis.xrange(k.stream, eid, eid, count=1)
        out[eid] = got[0][1][b"o"].decode() if got else ""
    return out


async def _committed(b: Backends, order_ids: list[str]) -> set[str]:
    rows = await b.pg.fetch(
        "SELECT order_id FROM orders WHERE order_id = ANY($1::text[])", order_ids
    )
    return {r["order_id"] for r in rows}


async def test_consumer_kill9_under_load(
    chaos_settings: Settings, direct: Backends, services: Services, figures: Figures,
    tmp_path: Any,
) -> None:
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    figures["seed"] = seed
    assert chaos_settings.database_url
    pg = urlsplit(chaos_settings.database_url)
    assert pg.hostname and pg.port
    async with running_app(chaos_settings) as api, TcpProxy(pg.hostname, pg.port) as proxy:
        sid = (await api.create_sale(stock=STOCK, per_user_limit=1000, hold_seconds=3600))[
            "sale_id"
        ]
        proxy.delay(PG_REPLY_DELAY_MS, "down")
        proxied = replace(chaos_settings, database_url=proxy.url(chaos_settings.database_url))
        consumer = services.add("consume", flashsale_env(proxied, tmp_path))
        load = LoadGenerator(
            api.base, sid, rate_per_s=RATE_PER_S, users=500, user_prefix="buyer", seed=seed
        )
        stop = asyncio.Event()
        load_task = asyncio.create_task(load.run(stop))

        kinds: Counter[str] = Counter()
        batch_at_kill: list[int] = []
        committed_before: set[str] = set()  # committed, unacked, seen at an earlier kill
        cycle = 0
        cycles_started = asyncio.get_running_loop().time()
        while cycle < CYCLES_MAX and (
            cycle < CYCLES_MIN or not (kinds["before_commit"] and kinds["after_commit_before_ack"])
        ):
            cycle += 1
            consumer.start()
            names = consumer.consumer_names
            if cycle % STARTUP_KILL_EVERY == 0:
                await asyncio.sleep(rnd.uniform(0.0, 0.3))
            else:
                await eventually(lambda: consumer_joined(direct, sid, consumer), timeout_s=20)
                await asyncio.sleep(rnd.uniform(0.0, 0.4))
            consumer.kill9()
            await asyncio.sleep(0.1)  # let PostgreSQL finish what the dead client had sent
            flight = await _in_flight(direct, sid, names)
            committed = await _committed(direct, [o for o in flight.values() if o])
            batch_at_kill.append(len(flight))
            if not flight:
                kinds["startup" if cycle % STARTUP_KILL_EVERY == 0 else "idle"] += 1
            elif committed - committed_before:
                kinds["after_commit_before_ack"] += 1
            else:
                kinds["before_commit"] += 1
            committed_before |= committed

        cycles_s = asyncio.get_running_loop().time() - cycles_started
        stop.set()
        await load_task
        proxy.delay(0)
        final_started = asyncio.get_running_loop().time()
        consumer.start()
        drain_s = await wait_drained(direct, sid, timeout_s=90)
        assert consumer.alive, consumer.log_tail()
        assert await consumer.stop() == 0, consumer.log_tail()
        final_s = asyncio.get_running_loop().time() - final_started

        a = await audit(direct, sid)
        groups: Any = await direct.redis.xinfo_consumers(
            direct.keys(sid).stream, direct.settings.consumer_group
        )
        dups = await direct.pg.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM orders WHERE sale_id = $1 AND status <> 'failed' "
            "AND idempotency_key IS NOT NULL GROUP BY user_id, idempotency_key "
            "HAVING count(*) > 1) d", sid,
        )

    accepted = set(load.stats.accepted)
    persisted = {o for o, (s, _q) in a.rows.items() if s in HOLDING}
    failed = {o for o, (s, _q) in a.rows.items() if s == "failed"}
    dead = {o for o in a.dead_lettered if o}
    compensated = failed | dead
    figures.update(
        cycles=cycle, cycles_s=round(cycles_s, 1), kills=dict(kinds),
        max_batch_at_kill=max(batch_at_kill),
        entries_in_flight_at_kills=sum(batch_at_kill), accepted=len(accepted),
        persisted=len(persisted), compensated=len(compensated), dead_lettered=len(a.dead_lettered),
        duplicates=int(dups), final_consumer_drain_s=round(drain_s, 2),
        final_consumer_total_s=round(final_s, 2),
        dead_consumers_in_group=len(groups) - len(consumer.consumer_names),
        load=load.stats.figures(), ledger=a.ledger,
    )
    print(f"\nconsumer kill -9: {cycle} cycles, kills {dict(kinds)}, accepted {len(accepted)}, "
          f"persisted {len(persisted)}, compensated {len(compensated)}, drain {drain_s:.2f}s")

    assert load.stats.replay_mismatches == 0
    assert set(load.stats.statuses) == {"202"}, load.stats.statuses
    assert kinds["before_commit"] >= 1 and kinds["after_commit_before_ack"] >= 1, kinds
    assert set(a.rows) <= accepted, "an order row nobody was told about"
    assert not persisted & compensated, "an order both persisted and compensated"
    assert accepted == persisted | compensated, (
        f"lost: {len(accepted - persisted - compensated)}"
    )
    assert int(dups) == 0
    assert a.sold == a.holding_qty
    assert a.drained and a.xpending == 0, a
    assert a.available == STOCK - a.holding_qty
    assert a.ledger["consistent"] is True, a.ledger


async def test_committed_entry_past_max_deliveries_is_acked_not_dead_lettered(
    chaos_settings: Settings, direct: Backends, figures: Figures
) -> None:
    """A consumer that dies after COMMIT and before the ack, again and again,
    leaves an entry whose order IS persisted but whose delivery count passes
    ``consumer_max_deliveries``. Reclaiming it must ack it as persisted;
    dead-lettering it would return its stock in Redis while PostgreSQL still
    counts the order as sold (ledger off by its quantity)."""
    s = chaos_settings
    async with running_app(s) as api:
        sid = (await api.create_sale(stock=10, per_user_limit=5))["sale_id"]
        status, body = await api.reserve(sid, "alice", 2, key="k-1")
        assert status == 202, body
        k = direct.keys(sid)
        # a consumer ("ghost") reads the entry and commits it, then dies before the ack
        got: Any = await direct.redis.xreadgroup(
            s.consumer_group, "ghost", {k.stream: ">"}, count=10
        )
        (eid, fields), = got[0][1]
        entry = record.from_entry(sid, eid.decode(), fields)
        async with direct.pg.acquire() as conn:
            assert await persist_batch(conn, [entry], "ghost") == []
        # ... max_deliveries times over: the delivery counter passes the bound
        await direct.redis.xclaim(
            k.stream, s.consumer_group, "ghost", 0, [eid], idle=60_000,
            retrycount=s.consumer_max_deliveries + 1,
        )
        persister = Persister(direct, Metrics(), name="survivor")
        await persister.step()
        a = await audit(direct, sid)
    figures.update(rows=a.status_counts(), dead_lettered=len(a.dead_lettered), ledger=a.ledger)
    assert a.dead_lettered == [], "a persisted order was dead-lettered (its stock returned)"
    assert a.rows == {entry.order_id: ("awaiting_payment", 2)}
    assert a.drained
    assert a.ledger["consistent"] is True, a.ledger
    assert a.available == 8


async def test_exhausted_entry_dead_lettered_once_across_a_crash(
    chaos_settings: Settings, direct: Backends, figures: Figures
) -> None:
    """A consumer records an exhausted entry's order as failed, then dies before
    moving it to the dead-letter stream: the next consumer finishes the job
    (the hold returned exactly once), it does not ack the entry as persisted."""
    s = chaos_settings
    async with running_app(s) as api:
        sid = (await api.create_sale(stock=10, per_user_limit=5))["sale_id"]
        status, body = await api.reserve(sid, "bob", 3, key="k-1")
        assert status == 202, body
        k = direct.keys(sid)
        got: Any = await direct.redis.xreadgroup(s.consumer_group, "ghost", {k.stream: ">"})
        (eid, fields), = got[0][1]
        entry = record.from_entry(sid, eid.decode(), fields)
        await direct.redis.xclaim(  # past twice the bound: no more tries, dead-letter it
            k.stream, s.consumer_group, "ghost", 0, [eid], idle=60_000,
            retrycount=2 * s.consumer_max_deliveries + 1,
        )
        # the consumer "dying" records the order failed ... and dies here
        assert await dead_letters.tombstone(direct, "dying", entry) is True
        await Persister(direct, Metrics(), name="next").step()
        a = await audit(direct, sid)
    figures.update(rows=a.status_counts(), dead_lettered=len(a.dead_lettered), ledger=a.ledger)
    assert a.rows == {entry.order_id: ("failed", 3)}
    assert a.dead_lettered == [entry.order_id]
    assert a.drained and a.holds == 0
    assert a.available == 10
    assert a.ledger["consistent"] is True, a.ledger


async def test_exhausted_entries_of_crashed_consumers_are_persisted_alone(
    chaos_settings: Settings, direct: Backends, figures: Figures
) -> None:
    """A crash counts a delivery against every entry the dead consumer held.
    Entries past ``consumer_max_deliveries`` that persist fine on their own are
    persisted (each alone), not failed; an entry that cannot be written is
    dead-lettered with its hold returned, and does not take the others along."""
    s = chaos_settings
    async with running_app(s) as api:
        sid = (await api.create_sale(stock=10, per_user_limit=5))["sale_id"]
        good = []
        for i in range(4):
            status, body = await api.reserve(sid, f"buyer-{i}", 1, key=f"k-{i}")
            assert status == 202, body
            good.append(body["order_id"])
        bad = await Reserver(direct).reserve(sid, "x" * 65, 1, "bad")  # CHECK refuses it
        assert isinstance(bad, Accepted), bad
        k = direct.keys(sid)
        got: Any = await direct.redis.xreadgroup(s.consumer_group, "crashed", {k.stream: ">"})
        ids = [eid for eid, _f in got[0][1]]
        await direct.redis.xclaim(
            k.stream, s.consumer_group, "crashed", 0, ids, idle=60_000,
            retrycount=s.consumer_max_deliveries + 1,
        )
        await Persister(direct, Metrics(), name="next").step()
        a = await audit(direct, sid)
    figures.update(rows=a.status_counts(), dead_lettered=a.dead_lettered, ledger=a.ledger)
    assert a.rows == {o: ("awaiting_payment", 1) for o in good}
    assert a.dead_lettered == [bad.order_id]
    assert a.drained and a.available == 6
    assert a.ledger["consistent"] is True, a.ledger
