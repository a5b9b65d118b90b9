"""A Redis Sentinel topology from the project's own files: a primary, a replica
and three sentinels, each a real ``redis-server`` child (the same binary runs
as a sentinel with ``--sentinel``) on free loopback ports.

For tests (tests/sentinel_support.py starts one per test) and for trying it by
hand: ``make sentinel`` (``python -m flashsale.run.embedded.sentinel``) starts
one, prints the environment a flashsale process needs to use it, and stops
everything on Ctrl-C.

Failover is quick on purpose: ``down-after-milliseconds`` 1000 and
``failover-timeout`` 3000, so a kill of the primary is followed by a promoted
replica within a few seconds. Both data nodes run with
``min-replicas-to-write 1``: a primary that has lost its replica (cut off, or
the only survivor) refuses writes after ``min-replicas-max-lag`` seconds, so
a stale primary cannot keep accepting what a failover will throw away.
No persistence: a node killed and started again comes back empty, as a
replica of the current primary, and full-syncs from it.

With one replica and acknowledgement on, a failover leaves the new primary
without a replica: it refuses writes (min-replicas-to-write) until the old
node is back as a replica (a paused one is demoted by the sentinels only
about 8 s after it wakes). Two replicas keep one acknowledging through a
failover (the failover chaos tests run so; ``--replicas 2``).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flashsale.run.embedded.nodes import LOOPBACK, Node, TopologyError, command, info, replicas_ok
from flashsale.run.embedded.servers import find_redis_server, free_port

MASTER_NAME = "flashsale"


class SentinelTopology:
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels on loopback."""

    def __init__(
        self, base_dir: Path, *, master_name: str = MASTER_NAME, replicas: int = 1,
        sentinels: int = 3, down_after_ms: int = 1000, failover_timeout_ms: int = 3000,
        min_replicas_to_write: int = 1, min_replicas_max_lag_s: int = 2,
    ) -> None:
        self.binary = str(find_redis_server())
        self.base_dir = base_dir
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.min_replicas_to_write = min_replicas_to_write
        self.min_replicas_max_lag_s = min_replicas_max_lag_s
        self.quorum = sentinels // 2 + 1
        self.data = [
            Node(f"redis-{i}", free_port(), base_dir / f"redis-{i}") for i in range(1 + replicas)
        ]
        self.sentinels = [
            Node(f"sentinel-{i}", free_port(), base_dir / f"sentinel-{i}")
            for i in range(sentinels)
        ]

    # ----------------------------------------------------------------- env

    @property
    def sentinel_addresses(self) -> str:
        return ",".join(f"{LOOPBACK}:{s.port}" for s in self.sentinels)

    def env(self) -> dict[str, str]:
        """What a flashsale process needs to use this topology."""
        return {
            "FLASHSALE_REDIS_SENTINELS": self.sentinel_addresses,
            "FLASHSALE_REDIS_SENTINEL_MASTER": self.master_name,
        }

    # ----------------------------------------------------------------- start / stop

    def _data_argv(self, node: Node, replica_of: int | None) -> list[str]:
        argv = [
            self.binary, "--port", str(node.port), "--bind", LOOPBACK, "--dir", str(node.dir),
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--min-replicas-to-write", str(self.min_replicas_to_write),
            "--min-replicas-max-lag", str(self.min_replicas_max_lag_s),
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
            "--repl-timeout", "5",
        ]
        if replica_of is not None:
            argv += ["--replicaof", LOOPBACK, str(replica_of)]
        return argv

    def start_data(self, timeout_s: float = 30.0) -> None:
        """The primary and its replicas only (no sentinels): bench/replicated.py."""
        primary, *replicas = self.data
        primary.start(self._data_argv(primary, None))
        for r in replicas:
            r.start(self._data_argv(r, primary.port))
        self.wait_replicas_synced(primary.port, len(replicas), timeout_s)

    def start(self, timeout_s: float = 30.0) -> None:
        primary = self.data[0]
        self.start_data(timeout_s)
        for s in self.sentinels:
            s.dir.mkdir(parents=True, exist_ok=True)
            conf = s.dir / "sentinel.conf"
            conf.write_text(
                f"port {s.port}\nbind {LOOPBACK}\ndaemonize no\ndir {s.dir}\n"
                f"sentinel monitor {self.master_name} {LOOPBACK} {primary.port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.master_name} 1\n"
            )
            s.start([self.binary, str(conf), "--sentinel"])
        self.wait_sentinels_ready(timeout_s)

    def stop(self) -> None:
        for n in (*self.sentinels, *self.data):
            n.resume()
            n.kill9()

    def __enter__(self) -> SentinelTopology:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- state

    def node(self, port: int) -> Node:
        return next(n for n in self.data if n.port == port)

    def sentinel_views(self) -> list[dict[str, str]]:
        """SENTINEL MASTER <name> of each sentinel that answers."""
        views = []
        for s in self.sentinels:
            if not s.alive or s.paused:
                continue
            with contextlib.suppress(TopologyError):
                flat = command(s.port, "SENTINEL", "MASTER", self.master_name).split("\n")
                views.append(dict(zip(flat[::2], flat[1::2], strict=False)))
        return views

    def agreed_primary(self) -> int | None:
        """The primary's port when every live sentinel names the same one."""
        ports = {int(v.get("port", "0")) for v in self.sentinel_views()}
        return ports.pop() if len(ports) == 1 else None

    def primary(self) -> Node:
        port = self.agreed_primary()
        if port is None:
            raise TopologyError("the sentinels do not agree on a primary")
        return self.node(port)

    def replicas(self) -> list[Node]:
        primary = self.primary()
        return [n for n in self.data if n is not primary]

    def wait_replicas_synced(
        self, primary_port: int | None, count: int, timeout_s: float = 30.0
    ) -> None:
        """Until ``count`` replicas are online (synced) at the primary and count
        as good for min-replicas-to-write (the primary takes writes again).
        ``primary_port`` None: the primary the sentinels agree on, asked again
        at every poll (with a short down-after-milliseconds a loaded machine
        may see a further failover meanwhile; the replicas then sync there)."""
        deadline = time.monotonic() + timeout_s
        while True:
            port = primary_port if primary_port is not None else self.agreed_primary()
            with contextlib.suppress(TopologyError):
                if port is None:
                    raise TopologyError("the sentinels do not agree on a primary")
                if replicas_ok(port, count):
                    return
            if time.monotonic() > deadline:
                raise TopologyError(f"{count} replica(s) not synced at {port} "
                                    f"in {timeout_s}s: {self.describe()}")
            time.sleep(0.05)

    def describe(self) -> str:
        """Each data node's replication state and the sentinels' views, for a
        failure message."""
        out = []
        for n in self.data:
            try:
                rep = info(n.port)
                state = {k: rep.get(k) for k in ("role", "master_port", "master_link_status",
                                                 "connected_slaves", "master_repl_offset")}
            except TopologyError as exc:
                state = {"error": str(exc)}
            out.append(f"{n.name}:{n.port} alive={n.alive} paused={n.paused} {state} "
                       f"log: {n.log_tail(4)!r}")
        views = [{k: v.get(k) for k in ("port", "flags", "num-slaves", "failover-state")}
                 for v in self.sentinel_views()]
        return "; ".join(out) + f"; sentinels: {views}"

    def wait_sentinels_ready(self, timeout_s: float = 30.0) -> None:
        """Until every live sentinel agrees on the primary, knows its replicas
        (as up) and the other sentinels: a failover can then happen."""
        want_replicas = len(self.data) - 1
        want_peers = len([s for s in self.sentinels if s.alive]) - 1
        deadline = time.monotonic() + timeout_s
        while True:
            views = self.sentinel_views()
            ok = (
                len(views) == want_peers + 1
                and self.agreed_primary() is not None
                and all(int(v.get("num-slaves", 0)) >= want_replicas
                        and int(v.get("num-other-sentinels", 0)) >= want_peers
                        and v.get("flags") == "master" for v in views)
                and self._replicas_up_at_sentinels(want_replicas)
            )
            if ok:
                return
            if time.monotonic() > deadline:
                raise TopologyError(f"sentinels not ready in {timeout_s}s: {views}")
            time.sleep(0.1)

    def _replicas_up_at_sentinels(self, want: int) -> bool:
        for s in self.sentinels:
            if not s.alive or s.paused:
                continue
            try:
                raw = command(s.port, "SENTINEL", "REPLICAS", self.master_name)
            except TopologyError:
                return False
            # flat array of flat maps: count the replicas flagged plainly "slave"
            fields = raw.split("\n")
            up = sum(1 for i, f in enumerate(fields[:-1])
                     if f == "flags" and fields[i + 1] == "slave")
            if up < want:
                return False
        return True

    def wait_failover(self, old_port: int, timeout_s: float = 30.0) -> tuple[int, float]:
        """Until the sentinels agree on a primary other than ``old_port`` and it
        says it is a master: (its port, seconds waited)."""
        started = time.monotonic()
        while True:
            port = self.agreed_primary()
            if port is not None and port != old_port:
                with contextlib.suppress(TopologyError):
                    if info(port).get("role") == "master":
                        return port, time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise TopologyError(f"no failover from {old_port} in {timeout_s}s: "
                                    f"{self.sentinel_views()}")
            time.sleep(0.05)

    def restart_as_replica(self, node: Node, timeout_s: float = 30.0) -> None:
        """Start a killed node again (empty) as a replica of the current primary;
        until it is synced and the sentinels see it up."""
        primary = self.primary()
        assert node is not primary and not node.alive
        node.start(self._data_argv(node, primary.port))
        self.wait_replicas_synced(None, len(self.data) - 1, timeout_s)
        self.wait_sentinels_ready(timeout_s)

    def kill_primary(self) -> Node:
        node = self.primary()
        node.kill9()
        return node


@contextlib.contextmanager
def running(base_dir: Path | None = None, **kwargs: Any) -> Iterator[SentinelTopology]:
    with contextlib.ExitStack() as stack:
        if base_dir is None:
            base_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fs-sentinel-")))
        topo = SentinelTopology(base_dir, **kwargs)
        stack.enter_context(topo)
        yield topo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashsale.run.embedded.sentinel",
        description="Start a primary, a replica and three sentinels on loopback; print the "
                    "environment flashsale needs; stop all on Ctrl-C.",
    )
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the nodes keep logs and configs (default: a temp dir)")
    parser.add_argument("--replicas", type=int, default=1, choices=range(1, 5),
                        help="replicas of the primary (2 keeps one acknowledging through a "
                             "failover; default 1)")
    opts = parser.parse_args(argv)
    stop = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with running(opts.dir, replicas=opts.replicas) as topo:
        primary = topo.primary()
        print(f"primary  127.0.0.1:{primary.port}")
        for r in topo.replicas():
            print(f"replica  127.0.0.1:{r.port}")
        for s in topo.sentinels:
            print(f"sentinel 127.0.0.1:{s.port}")
        print(f"logs in {topo.base_dir}\n\nuse it with:")
        for k, v in topo.env().items():
            print(f"export {k}={v}")
        print("unset FLASHSALE_REDIS_URL\n\nCtrl-C stops the topology.", flush=True)
        while not stop:
            time.sleep(0.2)
            dead = [n.name for n in (*topo.data, *topo.sentinels) if not n.alive]
            if dead and not stop:
                print(f"stopped: {', '.join(dead)} (restart with make sentinel)", flush=True)
                stop = True
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
