"""Test support for Redis Cluster: a real cluster of child redis-servers
(``--cluster-enabled yes``, flashsale/run/embedded/nodes.Node) on free
loopback ports. The slots are split evenly between the primaries (CLUSTER
ADDSLOTSRANGE), the nodes meet (CLUSTER MEET), and with ``replicas`` > 0
each primary gets that many replicas (CLUSTER REPLICATE), synced before the
cluster is handed out.
"""

from __future__ import annotations

import contextlib
import functools
import random
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from redis.crc import key_slot

from flashsale.run.embedded.nodes import LOOPBACK, Node, TopologyError, command, info, replicas_ok
from flashsale.run.embedded.servers import find_redis_server

SLOTS = 16384
BUS_OFFSET = 10_000
BUS_PORT_MAX = 65_535 - BUS_OFFSET
START_TRIES = 3


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too: Redis
    Cluster refuses ports above 55535 (measured: kernel-chosen ports above it
    made nodes exit at start)."""
    while True:
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if port > BUS_PORT_MAX:
            port = random.randint(20_000, BUS_PORT_MAX)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind((LOOPBACK, port))
                b.bind((LOOPBACK, port + BUS_OFFSET))
        except OSError:
            continue
        return port


def shard_of(key: str, primaries: int) -> int:
    """The index of the primary that owns ``key``'s slot (slots split as _join does)."""
    return min(key_slot(key.encode()) // (SLOTS // primaries), primaries - 1)


@dataclass
class ClusterTopology:
    """``primaries[i]`` owns the i-th range of slots; ``replicas[i]`` are its replicas."""

    primaries: list[Node]
    replicas: list[list[Node]]

    @property
    def nodes(self) -> list[Node]:
        return [*self.primaries, *(r for rs in self.replicas for r in rs)]

    @property
    def url(self) -> str:
        """A seed node for the cluster client."""
        return f"redis://{LOOPBACK}:{self.primaries[0].port}/0"

    def shard_of(self, key: str) -> int:
        return shard_of(key, len(self.primaries))

    def wait_synced(self, shard: int, timeout_s: float = 30.0) -> None:
        """Until the shard's primary sees all its replicas online and counts them
        good for min-replicas-to-write (it takes writes again)."""
        port = self.primaries[shard].port
        _until(f"shard {shard} ({port}): replicas synced",
               functools.partial(replicas_ok, port, len(self.replicas[shard])), timeout_s)

    def roles_agreed(self) -> bool:
        """Every node's CLUSTER NODES flags each replica "slave" (gossip has
        spread the roles: a primary denies its vote to a replica it still
        takes for a primary)."""
        want = {r.port for rs in self.replicas for r in rs}
        for x in self.nodes:
            rows = [line.split() for line in command(x.port, "CLUSTER", "NODES").splitlines()]
            seen = {int(row[1].split("@")[0].rpartition(":")[2]) for row in rows
                    if "slave" in row[2].split(",")}
            if seen != want:
                return False
        return True

    def failover(self, shard: int, timeout_s: float = 30.0) -> None:
        """A manual failover of the shard (CLUSTER FAILOVER on its first
        replica: it takes over the slots once it has caught up, the primary
        becomes its replica); the topology's lists follow the swap."""
        old, new = self.primaries[shard], self.replicas[shard][0]
        command(new.port, "CLUSTER", "FAILOVER")
        _until(f"{new.name} promoted", lambda: info(new.port).get("role") == "master", timeout_s)
        self.primaries[shard], self.replicas[shard][0] = new, old
        _until("every node seeing the new roles", self.roles_agreed, timeout_s)
        _until("cluster_state:ok on every node",
               lambda: all("cluster_state:ok" in command(x.port, "CLUSTER", "INFO")
                           for x in self.nodes), timeout_s)
        self.wait_synced(shard, timeout_s)


def _start_nodes(base_dir: Path, count: int, extra_args: Sequence[str]) -> list[Node]:
    """``count`` cluster-enabled nodes, each answering PING; a node that could
    not start (a port taken between probing and binding) is tried on another port."""
    binary = str(find_redis_server())
    nodes: list[Node] = []
    for i in range(count):
        for attempt in range(START_TRIES):
            node = Node(f"node-{i}", free_cluster_port(), base_dir / f"node-{i}")
            try:
                node.start([
                    binary, "--port", str(node.port), "--bind", LOOPBACK,
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--save", "", "--appendonly", "no", "--dir", str(node.dir), *extra_args,
                ])
            except TopologyError:
                node.kill9()
                if attempt == START_TRIES - 1:
                    raise
                continue
            nodes.append(node)
            break
    return nodes


def _until(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(TopologyError):
            if check():
                return
        if time.monotonic() > deadline:
            raise TopologyError(f"cluster: {what} not reached in {timeout_s}s")
        time.sleep(0.1)


def _replicates(port: int, primary_id: str) -> bool:
    return command(port, "CLUSTER", "REPLICATE", primary_id) == "OK"


def _join(topo: ClusterTopology, timeout_s: float) -> None:
    n = len(topo.primaries)
    step = SLOTS // n
    for i, p in enumerate(topo.primaries):
        hi = SLOTS - 1 if i == n - 1 else (i + 1) * step - 1
        command(p.port, "CLUSTER", "ADDSLOTSRANGE", str(i * step), str(hi))
    seed = topo.primaries[0].port
    for node in topo.nodes[1:]:
        command(seed, "CLUSTER", "MEET", LOOPBACK, str(node.port))
    total = len(topo.nodes)
    _until("every node knows every other",
           lambda: all(len(command(x.port, "CLUSTER", "NODES").splitlines()) == total
                       for x in topo.nodes), timeout_s)
    for p, replicas in zip(topo.primaries, topo.replicas, strict=True):
        primary_id = command(p.port, "CLUSTER", "MYID")
        for r in replicas:  # "Unknown node" until the replica has heard of the primary
            _until(f"{r.name} replicating {p.name}",
                   functools.partial(_replicates, r.port, primary_id), timeout_s)
    _until("every node seeing the replicas as replicas", topo.roles_agreed, timeout_s)
    _until("cluster_state:ok on every node",
           lambda: all("cluster_state:ok" in command(x.port, "CLUSTER", "INFO")
                       for x in topo.nodes), timeout_s)
    for shard in range(n):
        topo.wait_synced(shard, timeout_s)


@contextlib.contextmanager
def redis_cluster(
    base_dir: Path, *, primaries: int = 3, replicas: int = 0,
    extra_args: Sequence[str] = (), timeout_s: float = 30.0,
) -> Iterator[ClusterTopology]:
    """A running cluster of ``primaries`` primaries, each with ``replicas``
    replicas; every node started with ``extra_args`` (e.g. min-replicas-to-write)."""
    nodes: list[Node] = []
    try:
        nodes = _start_nodes(base_dir, primaries * (1 + replicas), extra_args)
        topo = ClusterTopology(
            primaries=nodes[:primaries],
            replicas=[nodes[primaries + i * replicas: primaries + (i + 1) * replicas]
                      for i in range(primaries)],
        )
        _join(topo, timeout_s)
        yield topo
    finally:
        for node in nodes:
            node.resume()
            node.kill9()
