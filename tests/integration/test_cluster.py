"""Redis Cluster: every script runs unchanged because every key of a sale
shares its hash tag. A real 3-node cluster of child redis-servers."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from redis.crc import key_slot

from flashsale.core.resolve import Resolver
from flashsale.room.admitter import Admitter
from flashsale.room.passes import PASS_HEADER
from flashsale.run.embedded.servers import find_redis_server
from tests.support import Api, running_app, test_settings

NODES = 3
SLOTS = 16384
BUS_OFFSET = 10_000
BUS_PORT_MAX = 65_535 - BUS_OFFSET


def _free_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too: Redis
    Cluster refuses ports above 55535 (measured: kernel-chosen ports above it
    made nodes exit at start)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port > BUS_PORT_MAX:
            port = random.randint(20_000, BUS_PORT_MAX)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + BUS_OFFSET))
        except OSError:
            continue
        return port


def _cmd(client: Redis, *args: str | int) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _start_nodes(binary: str, tmp: Path) -> tuple[list[int], list[subprocess.Popen[bytes]]]:
    """Start the nodes and wait for each to answer; None of them if one died
    (a port taken between probing and binding): the caller retries."""
    ports = [_free_port() for _ in range(NODES)]
    procs = [
        subprocess.Popen(
            [binary, "--port", str(p), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(tmp / f"nodes-{p}.conf"), "--save", "",
             "--appendonly", "no", "--dir", str(tmp), "--logfile", str(tmp / f"{p}.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for p in ports
    ]
    deadline = time.monotonic() + 20
    for port, proc in zip(ports, procs, strict=True):
        client = Redis(host="127.0.0.1", port=port)
        while True:
            try:
                client.ping()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    for other in procs:
                        other.kill()
                        other.wait()
                    return [], []
                time.sleep(0.05)
    return ports, procs


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    binary = str(find_redis_server())
    tmp = Path(tempfile.mkdtemp(prefix="flashsale-cluster-"))
    for _attempt in range(3):
        ports, procs = _start_nodes(binary, tmp)
        if ports:
            break
    else:
        raise RuntimeError(f"could not start {NODES} cluster nodes; logs in {tmp}")
    try:
        clients = [Redis(host="127.0.0.1", port=p) for p in ports]
        step = SLOTS // NODES
        for i, c in enumerate(clients):
            hi = SLOTS - 1 if i == NODES - 1 else (i + 1) * step - 1
            _cmd(c, "CLUSTER", "ADDSLOTS", *range(i * step, hi + 1))
        for p in ports[1:]:
            _cmd(clients[0], "CLUSTER", "MEET", "127.0.0.1", p)
        deadline = time.monotonic() + 30
        while not all(b"cluster_state:ok" in _cmd(c, "CLUSTER", "INFO") for c in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not become ok")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


async def test_sales_across_nodes_reserve_persist_release(
    cluster_url: str, database_url: str
) -> None:
    settings = test_settings(cluster_url, database_url, redis_cluster=True)
    async with running_app(settings) as api:
        sales = [(await api.create_sale(stock=20, per_user_limit=3))["sale_id"] for _ in range(6)]
        slots = {key_slot(api.backends.keys(s).sale.encode()) // (SLOTS // NODES) for s in sales}
        assert len(slots) >= 2, "the sales should land on more than one node"
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
        nodes = {key_slot(api.backends.keys(s).sale.encode()) // (SLOTS // NODES) for s in sales}
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
