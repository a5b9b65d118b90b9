"""Redis Cluster: every script runs unchanged because every key of a sale
shares its hash tag. A real 3-node cluster of child redis-servers
(tests/cluster_support.py); and a cluster of 3 primaries each with a replica
for "acknowledged means replicated" per shard (FLASHSALE_REDIS_REPLICA_ACKS)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from flashsale.config import Settings
from flashsale.core.resolve import Resolver
from flashsale.room.admitter import Admitter
from flashsale.room.passes import PASS_HEADER
from flashsale.run.embedded.nodes import info
from tests.chaos.history import History, HttpReader, Outcome
from tests.cluster_support import ClusterTopology, redis_cluster, shard_of
from tests.replica_support import STOCK, replica_gone, reserve_until_decided
from tests.support import Api, running_app, test_settings

NODES = 3


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="flashsale-cluster-") as tmp, \
            redis_cluster(Path(tmp), primaries=NODES) as topo:
        yield topo.url


async def test_sales_across_nodes_reserve_persist_release(
    cluster_url: str, database_url: str
) -> None:
    settings = test_settings(cluster_url, database_url, redis_cluster=True)
    async with running_app(settings) as api:
        sales = [(await api.create_sale(stock=20, per_user_limit=3))["sale_id"] for _ in range(6)]
        shards = {shard_of(api.backends.keys(s).sale, NODES) for s in sales}
        assert len(shards) >= 2, "the sales should land on more than one node"
        await _spike(api, sales)
        status, body, _ = await api.request("GET", "/readyz")
        assert status == 200, body


async def _spike(api: Api, sales: list[str]) -> None:
    # a key per sale: one buyer's key on two sales is 422 (see the test below)
    calls = [(s, f"u{i % 15}", f"{s}-k{i}") for s in sales for i in range(40)]
    results = await asyncio.gather(*(api.reserve(s, u, 1, key=k) for s, u, k in calls))
    accepted: dict[str, list[str]] = {s: [] for s in sales}
    for (sale_id, _u, _k), (status, body) in zip(calls, results, strict=True):
        assert status in (202, 409), body
        if status == 202:
            accepted[sale_id].append(body["order_id"])
    replay = await api.reserve(calls[0][0], calls[0][1], 1, key=calls[0][2])
    assert replay == results[0]
    for sale_id in sales:
        assert len(accepted[sale_id]) == 20
        await api.drain(sale_id)
        led = await api.ledger(sale_id)
        assert led["consistent"] and led["awaiting_payment"] == 20, led
    first = accepted[sales[0]][0]
    owner = (await api.backends.pg.fetchval(
        "SELECT user_id FROM orders WHERE order_id = $1", first))
    status, body, _ = await api.request(
        "POST", f"/api/v1/orders/{first}/cancel", headers=api.buyer(owner)
    )
    assert status == 200 and body["status"] == "cancelled", body
    led = await api.ledger(sales[0])
    assert led["consistent"] and led["available"] == 1 and led["cancelled"] == 1


async def test_idempotency_key_reused_across_sales_is_422(
    cluster_url: str, database_url: str
) -> None:
    """The sale's idempotency record lives in the sale's slot, so alone it
    cannot see the same buyer's key on another sale (old code: a second 202).
    The buyer's claim of the key (its own slot, SET NX before the script)
    makes the contract hold as on one Redis: 422, also when both race."""
    settings = test_settings(cluster_url, database_url, redis_cluster=True)
    async with running_app(settings) as api:
        a, b, c, d = [(await api.create_sale(stock=5))["sale_id"] for _ in range(4)]
        assert key_slot(api.backends.keys(a).sale.encode()) != key_slot(
            api.backends.keys(b).sale.encode()
        )
        first = await api.reserve(a, "buyer", 1, key="k-1")
        assert first[0] == 202, first
        other_sale = await api.reserve(b, "buyer", 1, key="k-1")
        assert other_sale[0] == 422 and other_sale[1]["error"]["code"] == "idempotency_key_reused"
        other_body = await api.reserve(a, "buyer", 2, key="k-1")
        assert other_body[0] == 422, other_body
        assert await api.reserve(a, "buyer", 1, key="k-1") == first  # the replay still works
        # the lookup of a lost reply reaches the sale's node on a fresh connection
        now_ms = int(time.time() * 1000)
        found = await Resolver(api.backends)._lookup(
            a, [first[1]["order_id"], f"{a}-never"], now_ms, 2.0
        )
        assert found is not None and found[f"{a}-never"] == (-6, ""), found
        assert found[first[1]["order_id"]][1].split("\t")[:2] == [first[1]["order_id"], "1"]
        assert (await api.reserve(b, "someone-else", 1, key="k-1"))[0] == 202  # per buyer
        raced = await asyncio.gather(
            api.reserve(c, "racer", 1, key="k-2"), api.reserve(d, "racer", 1, key="k-2")
        )
        assert sorted(s for s, _ in raced) == [202, 422], raced
        for sale_id in (a, b, c, d):
            await api.drain(sale_id)
        held = {s: (await api.ledger(s))["awaiting_payment"] for s in (a, b, c, d)}
        assert held[a] == 1 and held[b] == 1 and held[c] + held[d] == 1, held


async def test_waiting_room_on_the_cluster(cluster_url: str, database_url: str) -> None:
    """The room's keys share the sale's hash tag, so its scripts run unchanged on
    a cluster: on sales spread over the nodes a buyer joins, is admitted by the
    admitter, reserves with the pass (202), and a second use of it is 403."""
    settings = test_settings(cluster_url, database_url, redis_cluster=True)
    room = {"admit_per_s": 100, "pass_seconds": 60}
    async with running_app(settings) as api:
        sales = [(await api.create_sale(stock=1, per_user_limit=2, waiting_room=room))["sale_id"]
                 for _ in range(4)]
        nodes = {shard_of(api.backends.keys(s).sale, NODES) for s in sales}
        assert len(nodes) >= 2, "the sales should land on more than one node"
        for sid in sales:
            await _join_admit_reserve(api, sid)
        status, body, _ = await api.request(
            "GET", f"/api/v1/admin/sales/{sales[0]}/waiting-room", headers=api.admin
        )
        assert status == 200 and body["used"] == 1 and body["admitted_total"] == 1, body


async def _join_admit_reserve(api: Api, sid: str) -> None:
    buyer = api.buyer("roomer")
    status, t, _ = await api.request("POST", f"/api/v1/sales/{sid}/queue", headers=buyer)
    assert status == 201 and t["state"] == "waiting" and t["position"] == 0, t
    assert await Admitter(api.backends).step(sid) == 1
    status, t, _ = await api.request(
        "GET", f"/api/v1/sales/{sid}/queue/{t['ticket_id']}", headers=buyer
    )
    assert status == 200 and t["state"] == "admitted" and t["pass"], t
    with_pass = {**buyer, PASS_HEADER: t["pass"]}
    status, order, _ = await api.request(
        "POST", f"/api/v1/sales/{sid}/orders", json={}, headers=with_pass
    )
    assert status == 202, order
    status, again, _ = await api.request(
        "POST", f"/api/v1/sales/{sid}/orders", json={}, headers=with_pass
    )
    assert status == 403 and again["error"]["code"] == "pass_required", again
    # stock 0 with the hold outstanding: the step's close check (a pipeline and
    # XINFO on the sale's node) leaves the room open
    assert await Admitter(api.backends).step(sid) == 0
    status, t, _ = await api.request(
        "GET", f"/api/v1/sales/{sid}/queue/{t['ticket_id']}", headers=buyer
    )
    assert status == 200 and t["state"] == "used", t
# ------------------------------------------------------------ replica acknowledgement per shard

# as production should run a cluster with replicas: a primary without its
# replica refuses writes (after 2 s of lag) instead of accepting what a
# failover would lose (flashsale/core/replication.py)
REPLICA_ARGS = ("--min-replicas-to-write", "1", "--min-replicas-max-lag", "2",
                "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")
ACK_TIMEOUT_MS = 300


@pytest.fixture(scope="module")
def replicated_cluster() -> Iterator[ClusterTopology]:
    """3 primaries, each with one replica."""
    with tempfile.TemporaryDirectory(prefix="flashsale-cluster-r-") as tmp, \
            redis_cluster(Path(tmp), primaries=NODES, replicas=1, extra_args=REPLICA_ARGS) as topo:
        yield topo


def _acked_settings(topo: ClusterTopology, database_url: str) -> Settings:
    return test_settings(topo.url, database_url, redis_cluster=True, redis_replica_acks=1,
                         redis_replica_ack_timeout_ms=ACK_TIMEOUT_MS)


async def _sale_per_shard(api: Api, topo: ClusterTopology, shards: int, **fields: Any) -> list[str]:
    """One new sale on each of the first ``shards`` shards (sale ids are random)."""
    found: dict[int, str] = {}
    for _ in range(100):
        sid = (await api.create_sale(**fields))["sale_id"]
        found.setdefault(topo.shard_of(api.backends.keys(sid).sale), sid)
        if len(found) >= shards:
            return [found[i] for i in sorted(found)][:shards]
    raise AssertionError(f"sales landed on {len(found)} shard(s) only")


def _wait_calls(port: int) -> int:
    """WAIT commands the node ran (INFO commandstats)."""
    stat = info(port, "commandstats").get("cmdstat_wait", "calls=0")
    return int(stat.split(",")[0].partition("=")[2])


async def test_replica_acks_wait_on_the_node_that_owns_the_sale(
    replicated_cluster: ClusterTopology, database_url: str
) -> None:
    """FLASHSALE_REDIS_REPLICA_ACKS=1 on a cluster with a replica per shard:
    a sale on every shard takes its reservations (202); each batch's one WAIT
    runs on the primary that owns the sale's slot (no other primary counts
    one), on the script's own connection: right after each 202 the shard's
    replica already holds the reservation. Before: the setting was refused,
    and the script and WAIT went through the cluster client's pipeline, which
    sends WAIT (keyless) to every primary on connections that wrote nothing."""
    topo = replicated_cluster
    settings = _acked_settings(topo, database_url)
    async with running_app(settings) as api:
        sales = await _sale_per_shard(api, topo, NODES, stock=10, per_user_limit=1)
        for sid in sales:
            k = api.backends.keys(sid)
            shard = topo.shard_of(k.sale)
            before = [_wait_calls(p.port) for p in topo.primaries]
            replica = Redis(host="127.0.0.1", port=topo.replicas[shard][0].port,
                            single_connection_client=True)
            try:
                await replica.execute_command("READONLY")  # type: ignore[no-untyped-call]
                for i in range(3):
                    status, body = await api.reserve(sid, f"u{i}", 1, key=f"{sid}-{i}")
                    assert status == 202, body
                    on_replica = await replica.hget(k.sale, "available")
                    assert on_replica == str(10 - i - 1).encode(), (shard, i, on_replica)
            finally:
                await replica.aclose()
            waits = [_wait_calls(p.port) - b for p, b in zip(topo.primaries, before, strict=True)]
            assert waits == [3 if i == shard else 0 for i in range(NODES)], (shard, waits)
            await api.drain(sid)
            led = await api.ledger(sid)
            assert led["consistent"] and led["awaiting_payment"] == 3, led


async def test_replica_acks_follow_a_shard_failover(
    replicated_cluster: ClusterTopology, database_url: str
) -> None:
    """A manual failover of the sale's shard (CLUSTER FAILOVER on its replica):
    the front's slot map still names the old primary, now a replica, which
    answers the batch script MOVED; the map is patched and the batch sent to
    the new owner, acknowledged by its new replica (the old primary): 202.
    Without the MOVED handling the script and WAIT, sent to the node the
    stale map names, answered 503 until the map was refreshed by something
    else (nothing in the reservation path does)."""
    topo = replicated_cluster
    settings = _acked_settings(topo, database_url)
    history = History()
    async with running_app(settings) as api:
        sid = (await api.create_sale(stock=10, per_user_limit=1))["sale_id"]
        k = api.backends.keys(sid)
        shard = topo.shard_of(k.sale)
        assert (await reserve_until_decided(api, history, sid, "u0", "k0"))[0] is Outcome.OK
        await asyncio.to_thread(topo.failover, shard)
        try:
            new_primary = topo.primaries[shard].port
            waits_before = _wait_calls(new_primary)
            after = [await reserve_until_decided(api, history, sid, f"u{i}", f"k{i}", 10.0)
                     for i in range(1, 4)]
            waits = _wait_calls(new_primary) - waits_before
            node = api.backends.redis.get_node_from_key(k.sale)  # type: ignore[union-attr]
        finally:  # the module's cluster as it was
            await asyncio.to_thread(topo.failover, shard)
        await api.drain(sid)
        led = await api.ledger(sid)
        verdict = await history.check(HttpReader(api.backends, api.base, settings.admin_token))
    assert [o for o, _t in after] == [Outcome.OK] * 3, after
    assert max(t for _o, t in after) < 2.0, after  # the first one at once, not after retries
    # one WAIT per batch, each on the new owner; the first batch there may be
    # sent twice: scripts are not replicated, so the promoted replica may
    # answer NOSCRIPT (loaded, sent again)
    assert 3 <= waits <= 4, waits
    assert node is not None and int(node.port) == new_primary
    assert led["consistent"] and led["awaiting_payment"] == 4, led
    verdict.assert_valid()


@pytest.mark.chaos
@pytest.mark.parametrize("fault", ["kill", "pause"])
async def test_shard_replica_gone_503_nothing_reserved(
    replicated_cluster: ClusterTopology, database_url: str, fault: str
) -> None:
    """One shard's replica is killed (its primary refuses the script at once:
    NOREPLICAS) or paused (SIGSTOP: the batch's WAIT falls short, the batch is
    released, then NOREPLICAS once the lag passes min-replicas-max-lag): each
    reservation on a sale of that shard answers 503 "nothing reserved" within
    the ack timeout and nothing stays held, while another shard's sale still
    takes reservations; once the replica is back the same keys are accepted
    (tests/replica_support.py, as for Sentinel)."""
    topo = replicated_cluster
    settings = _acked_settings(topo, database_url)
    history = History()
    async with running_app(settings) as api:
        sid, other = await _sale_per_shard(api, topo, 2, stock=STOCK, per_user_limit=1)
        shard = topo.shard_of(api.backends.keys(sid).sale)
        replica = topo.replicas[shard][0]

        def restore() -> None:
            if replica.paused:
                replica.resume()
            if not replica.alive:  # comes back empty, a replica again (its nodes.conf)
                replica.start(replica.argv)
            topo.wait_synced(shard)

        async def other_shard_serves() -> None:
            # no key: a key's claim lives in the buyer's own slot (reserve._claim),
            # which may be on the shard without its replica
            outcome, reply = await history.reserve(api, other, "elsewhere", 1)
            assert outcome is Outcome.OK, reply

        try:
            gone = await replica_gone(api, history, sid, restore=restore,
                                      fault=replica.kill9 if fault == "kill" else replica.pause,
                                      during=other_shard_serves)
        finally:  # the module's cluster stays whole for the next test
            await asyncio.to_thread(restore)
        verdict = await history.check(HttpReader(api.backends, api.base, settings.admin_token))
    gone.assert_nothing_reserved(ACK_TIMEOUT_MS)
    verdict.assert_valid()
    assert verdict.accepted_orders == STOCK + 1 and verdict.ok == STOCK + 1
    if fault == "pause":  # the WAIT path ran: those orders were made and released
        assert gone.released >= 1, gone.answered
    print(f"\nshard {shard} replica gone: {gone.answered}")
