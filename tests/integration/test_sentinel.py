"""Redis through Sentinel, and "acknowledged means replicated", on a real
topology: a primary, a replica and three sentinels (redis-server processes,
flashsale/run/embedded/sentinel.py) per test.

* configuration: FLASHSALE_REDIS_SENTINELS / _SENTINEL_MASTER / _REPLICA_ACKS
  / _REPLICA_ACK_TIMEOUT_MS, parsed and bounded;
* the front follows a failover (kill -9 of the primary) without a restart;
* a replica that is gone: reservations answer 503 "nothing reserved" within
  the ack timeout, nothing is held or oversold, a retry with the same key
  decides afresh, and service resumes when the replica returns.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from flashsale.config import ConfigError, Settings
from flashsale.run.embedded.sentinel import SentinelTopology, info
from tests.chaos.history import History, HttpReader, Outcome
from tests.sentinel_support import sentinel_settings, sentinel_topology
from tests.support import Api, running_app

SENTINELS = "127.0.0.1:26379, [::1]:26380,sentinel-3.internal:26381"


def test_sentinel_settings_parse() -> None:
    s = Settings.from_env({"FLASHSALE_REDIS_SENTINELS": SENTINELS})
    assert s.redis_sentinels == (("127.0.0.1", 26379), ("::1", 26380),
                                 ("sentinel-3.internal", 26381))
    assert s.redis_url is None and s.redis_given
    assert s.redis_sentinel_master == "flashsale"
    assert s.redis_replica_acks == 1  # on by default with Sentinel
    assert s.redis_replica_ack_timeout_ms == 500
    s = Settings.from_env({"FLASHSALE_REDIS_SENTINELS": SENTINELS,
                           "FLASHSALE_REDIS_SENTINEL_MASTER": "shop-1",
                           "FLASHSALE_REDIS_REPLICA_ACKS": "0"})
    assert s.redis_sentinel_master == "shop-1" and s.redis_replica_acks == 0
    # single Redis and Cluster: off unless set
    assert Settings.from_env({"FLASHSALE_REDIS_URL": "redis://h:1/0"}).redis_replica_acks == 0
    assert Settings.from_env({
        "FLASHSALE_REDIS_URL": "redis://h:1/0", "FLASHSALE_REDIS_REPLICA_ACKS": "2",
    }).redis_replica_acks == 2
    # the embedded Redis URL never replaces the sentinels
    assert s.with_urls("redis://embedded:1/0", "postgresql://x/y").redis_url is None


@pytest.mark.parametrize(("env", "message"), [
    ({"FLASHSALE_REDIS_SENTINELS": "h1"}, "host:port"),
    ({"FLASHSALE_REDIS_SENTINELS": "h1:0"}, "host:port"),
    ({"FLASHSALE_REDIS_SENTINELS": "h1:70000"}, "host:port"),
    ({"FLASHSALE_REDIS_SENTINELS": "h1:1,,h2:2"}, "host:port"),
    ({"FLASHSALE_REDIS_SENTINELS": "user@h1:1"}, "host:port"),
    ({"FLASHSALE_REDIS_SENTINELS": ",".join(f"h:{i}" for i in range(1, 18))}, "at most"),
    ({"FLASHSALE_REDIS_SENTINELS": "h:1", "FLASHSALE_REDIS_SENTINEL_MASTER": "a b"}, "MASTER"),
    ({"FLASHSALE_REDIS_SENTINELS": "h:1", "FLASHSALE_REDIS_URL": "redis://h:1"}, "not both"),
    ({"FLASHSALE_REDIS_SENTINELS": "h:1", "FLASHSALE_REDIS_CLUSTER": "1"}, "exclude"),
    ({"FLASHSALE_REDIS_REPLICA_ACKS": "-1"}, "between"),
    ({"FLASHSALE_REDIS_REPLICA_ACKS": "17"}, "between"),
    ({"FLASHSALE_REDIS_REPLICA_ACKS": "one"}, "integer"),
    ({"FLASHSALE_REDIS_REPLICA_ACK_TIMEOUT_MS": "0"}, "between"),
    ({"FLASHSALE_REDIS_REPLICA_ACK_TIMEOUT_MS": "5000"}, "between"),
    ({"FLASHSALE_REDIS_CLUSTER": "1", "FLASHSALE_REDIS_REPLICA_ACKS": "1"}, "CLUSTER"),
])
def test_sentinel_settings_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        Settings.from_env(env)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.fixture
def topology(tmp_path: Path) -> object:
    with sentinel_topology(tmp_path / "topology") as topo:
        yield topo


async def _reserve_until_decided(
    api: Api, history: History, sale_id: str, user: str, key: str, timeout_s: float = 30.0
) -> tuple[Outcome, float]:
    """Retry with the same key until a decided answer: (outcome, seconds)."""
    started = time.monotonic()
    while True:
        outcome, reply = await history.reserve(api, sale_id, user, 1, key)
        if outcome is Outcome.OK or (outcome is Outcome.FAILED and reply.status not in (429, 503)):
            return outcome, time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"{key} undecided: {reply}"
        await asyncio.sleep(0.1)


async def test_front_follows_a_failover_without_restart(
    topology: SentinelTopology, database_url: str
) -> None:
    settings = sentinel_settings(topology, database_url)
    history = History()
    async with running_app(settings) as api:
        sid = (await api.create_sale(stock=50, per_user_limit=5))["sale_id"]
        for i in range(5):
            outcome, _ = await _reserve_until_decided(api, history, sid, f"u{i}", f"before-{i}")
            assert outcome is Outcome.OK
        await api.drain(sid)
        old = topology.kill_primary()
        new_port, failover_s = topology.wait_failover(old.port)
        topology.restart_as_replica(old)
        outcome, took_s = await _reserve_until_decided(api, history, sid, "u9", "after-kill")
        assert outcome is Outcome.OK
        pool = getattr(api.backends.redis, "connection_pool", None)
        assert getattr(pool, "master_address", None) == ("127.0.0.1", new_port)
        verdict = await history.check(HttpReader(api.backends, api.base, settings.admin_token))
    verdict.assert_valid()
    assert verdict.accepted_orders == 6 and verdict.lost == 0
    print(f"\nfailover in {failover_s:.2f}s; first 202 after it in {took_s:.2f}s")


@pytest.mark.parametrize("fault", ["kill", "pause"])
async def test_replica_gone_reservations_503_nothing_reserved(
    topology: SentinelTopology, database_url: str, fault: str
) -> None:
    """The replica is killed (the primary sees its link close and refuses the
    script at once: NOREPLICAS) or paused (SIGSTOP: the primary counts it good
    for min-replicas-max-lag, so the scripts run, the batch's WAIT falls short
    and the batch is released, then NOREPLICAS): each reservation answers 503
    "nothing reserved" within the ack timeout, nothing stays held; once the
    replica is back the same keys are accepted."""
    timeout_ms = 300
    settings = sentinel_settings(topology, database_url,
                                 redis_replica_ack_timeout_ms=timeout_ms)
    history = History()
    async with running_app(settings) as api:
        sid = (await api.create_sale(stock=5, per_user_limit=1))["sale_id"]
        outcome, _ = await _reserve_until_decided(api, history, sid, "early", "early")
        assert outcome is Outcome.OK
        replica = topology.replicas()[0]
        if fault == "kill":
            replica.kill9()
        else:
            replica.pause()
        answered: list[tuple[int | None, str | None, float]] = []
        for i in range(8):  # spans the lag after which the primary refuses writes
            started = time.monotonic()
            _outcome, reply = await history.reserve(api, sid, f"gone-{i}", 1, f"gone-{i}")
            answered.append((reply.status, reply.message, time.monotonic() - started))
            await asyncio.sleep(0.4)
        sale = (await api.request("GET", f"/api/v1/sales/{sid}"))[1]
        primary = topology.primary()
        if fault == "kill":
            topology.restart_as_replica(replica)
        else:
            replica.resume()
            topology.wait_replicas_synced(primary.port, 1)
        await api.drain(sid)  # voided orders are acked as failed: pending falls back
        ledger = await api.ledger(sid)
        resumed = [await _reserve_until_decided(api, history, sid, f"gone-{i}", f"gone-{i}")
                   for i in range(5)]
        assert info(primary.port)["connected_slaves"] == "1"
        verdict = await history.check(HttpReader(api.backends, api.base, settings.admin_token))
    statuses = [s for s, _m, _t in answered]
    assert statuses == [503] * len(answered), answered
    assert all("nothing was reserved" in (m or "") or "NOREPLICAS" in (m or "")
               for _s, m, _t in answered), answered
    assert max(t for _s, _m, t in answered) < timeout_ms / 1000 + 1.0, answered
    assert sale["available"] == 4, sale  # nothing held by the refused ones
    assert ledger["consistent"] is True, ledger
    assert [o for o, _t in resumed] == [Outcome.OK] * 4 + [Outcome.FAILED]  # stock 5
    verdict.assert_valid()
    assert verdict.accepted_orders == 5 and verdict.ok == 5
    voided = sum(1 for _s, m, _t in answered if "nothing was reserved" in (m or ""))
    if fault == "pause":  # the WAIT path ran: those orders were made and released
        assert voided >= 1, answered
    print(f"\nreplica gone: {answered}")
