"""Redis restarts having lost its last writes (the second ``appendfsync
everysec`` may lose): the sale hash is still there, PostgreSQL has orders that
Redis no longer knows. flashsale must notice before it reserves again.

A dedicated redis-server child (never the machine's shared one) with an AOF
fsynced on every write (and no rewrite) backs the HTTP front; the stream
consumer runs in the test on a client of its own. The lost second is made
exactly: half the stock is reserved and persisted, the AOF is copied, the
other half is reserved and persisted (the sale sells out), then Redis is
killed (-9) and started from the copy. Redis then has `available` = half the
stock and a stream last generated below the last entry PostgreSQL persisted
(its watermark, sales.persisted_stream_ms/_seq).

* through the front: a rush of new buyers, each retrying 503 until decided,
  must be sold nothing (accepted in all <= stock), and the ledger must be
  consistent once drained;
* through the periodic sweep (``ledger.rebuild_missing``, the compensator's
  5 s loop and its start): the sale is rebuilt from PostgreSQL.

On the old code Redis granted the lost half again (202s past the stock; the
consumer then failed them: "final deduction refused") and the sweep left the
sale as it was (ledger inconsistent).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis

from flashsale.config import Settings
from flashsale.core import ledger
from flashsale.core.backends import Backends, open_backends
from flashsale.core.persist import Persister
from flashsale.ops.metrics import Metrics
from tests.chaos.conftest import Figures
from tests.chaos.faultkit import DurableRedis
from tests.chaos.harness import Request, audit, burst, wait_drained
from tests.support import Api, running_app

pytestmark = pytest.mark.chaos

STOCK = 40
HALF = STOCK // 2
RUSH = 60
ROUNDS_MAX = 200  # 503 retry rounds of the rush (50 ms apart)


class LosableRedis(DurableRedis):
    """AOF fsynced on every write and never rewritten, so a copy of its
    directory taken while nothing is written is an exact earlier state."""

    def persistence_args(self) -> list[str]:
        return [*super().persistence_args(), "--auto-aof-rewrite-percentage", "0"]

    @property
    def aof_dir(self) -> Path:
        return self.dir / "appendonlydir"

    def keep(self) -> None:
        shutil.copytree(self.aof_dir, self.dir / "kept")

    def restart_losing_since_kept(self) -> None:
        """kill -9, then start from the AOF as it was at keep()."""
        self.kill9()
        shutil.rmtree(self.aof_dir)
        shutil.copytree(self.dir / "kept", self.aof_dir)
        self.start()
        self.restarts += 1


async def _drain(b: Backends, sid: str) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(Persister(b, Metrics()).run(stop))
    try:
        await wait_drained(b, sid, timeout_s=30)
    finally:
        stop.set()
        await task


def _reqs(prefix: str, n: int) -> list[Request]:
    return [Request(f"{prefix}-{i}", f"{prefix}-key-{i}", 1) for i in range(n)]


async def _accept_all(api: Api, sid: str, reqs: list[Request]) -> None:
    results = await burst(api.base, sid, reqs)
    assert Counter(s for _r, s, _b in results) == {202: len(reqs)}, results[:3]


async def _lose_the_last_half(
    b: Backends, api: Api, redis: LosableRedis
) -> tuple[str, dict[str, object]]:
    sid = (await api.create_sale(stock=STOCK, per_user_limit=1, hold_seconds=600))["sale_id"]
    await _accept_all(api, sid, _reqs("early", HALF))
    await _drain(b, sid)
    redis.keep()
    await _accept_all(api, sid, _reqs("late", STOCK - HALF))
    await _drain(b, sid)
    row = await b.pg.fetchrow("SELECT * FROM sales WHERE sale_id = $1", sid)
    assert row is not None and row["sold"] == STOCK
    mark = (row.get("persisted_stream_ms"), row.get("persisted_stream_seq"))
    redis.restart_losing_since_kept()
    assert isinstance(b.redis, Redis)
    await b.redis.connection_pool.disconnect()  # the test's own links died with the server
    k = b.keys(sid)
    lost: dict[str, object] = {
        "available_in_redis_after_loss": int(await b.redis.hget(k.sale, "available") or -1),
        "stream_last_id_after_loss": (await b.redis.xinfo_stream(k.stream))[
            "last-generated-id"].decode(),
        "persisted_watermark": f"{mark[0]}-{mark[1]}",
    }
    assert lost["available_in_redis_after_loss"] == HALF  # the lost second, exactly
    return sid, lost


async def test_lost_second_noticed_by_the_front_before_it_reserves(
    chaos_settings: Settings, figures: Figures, tmp_path: Path,
) -> None:
    redis = LosableRedis(tmp_path / "redis")
    redis.start()
    try:
        settings = replace(chaos_settings, redis_url=redis.url)
        async with open_backends(settings) as b, running_app(settings) as api:
            sid, lost = await _lose_the_last_half(b, api, redis)
            started = time.monotonic()
            statuses: Counter[int] = Counter()
            todo = _reqs("rush", RUSH)
            accepted = 0
            first_decided_s = None
            for _round in range(ROUNDS_MAX):
                results = await burst(api.base, sid, todo)
                statuses.update(s for _r, s, _b in results)
                accepted += sum(1 for _r, s, _b in results if s == 202)
                if first_decided_s is None and any(s != 503 for _r, s, _b in results):
                    first_decided_s = time.monotonic() - started
                todo = [r for r, s, _b in results if s == 503]
                if not todo:
                    break
                await asyncio.sleep(0.05)
            assert not todo, f"{len(todo)} reservations still 503 after {ROUNDS_MAX} rounds"
            await _drain(b, sid)
            final = await audit(b, sid)
    finally:
        redis.kill9()
    figures.update(
        stock=STOCK, accepted_before_loss=STOCK, rush=RUSH, rush_statuses=dict(statuses),
        rush_accepted=accepted, accepted_total=STOCK + accepted,
        first_decided_after_restart_s=round(first_decided_s or -1, 3),
        ledger_after=final.ledger, statuses_after=final.status_counts(), **lost,
    )
    print(f"\nlost second: Redis back with available {lost['available_in_redis_after_loss']} "
          f"of {STOCK} sold; rush {RUSH} -> {dict(statuses)}; accepted in all "
          f"{STOCK + accepted} of stock {STOCK}")
    assert STOCK + accepted <= STOCK, f"oversold: {STOCK + accepted} accepted, stock {STOCK}"
    assert set(statuses) <= {409, 503}, statuses
    assert final.sold == final.holding_qty == STOCK
    assert final.available == 0
    assert final.ledger["consistent"] is True, final.ledger


async def test_lost_second_noticed_by_the_periodic_sweep(
    chaos_settings: Settings, figures: Figures, tmp_path: Path,
) -> None:
    redis = LosableRedis(tmp_path / "redis")
    redis.start()
    try:
        settings = replace(chaos_settings, redis_url=redis.url)
        async with open_backends(settings) as b, running_app(settings) as api:
            sid, lost = await _lose_the_last_half(b, api, redis)
            rebuilt = await ledger.rebuild_missing(b)  # the compensator's sweep
            again = await ledger.rebuild_missing(b)
            final = await audit(b, sid)
            after = await burst(api.base, sid, _reqs("after", 5))
    finally:
        redis.kill9()
    figures.update(rebuilt=rebuilt, rebuilt_again=again, ledger_after=final.ledger, **lost)
    assert sid in rebuilt and sid not in again
    assert final.available == 0 and final.sold == STOCK
    assert final.ledger["consistent"] is True, final.ledger
    assert {s for _r, s, _b in after} <= {409, 503}


async def test_lost_second_noticed_at_the_front_start(
    chaos_settings: Settings, figures: Figures, tmp_path: Path,
) -> None:
    """A front started after the loss (the machine rebooted) verifies Redis
    before it serves: the sale is rebuilt before the first request."""
    redis = LosableRedis(tmp_path / "redis")
    redis.start()
    try:
        settings = replace(chaos_settings, redis_url=redis.url)
        async with open_backends(settings) as b:
            async with running_app(settings) as api:
                sid, lost = await _lose_the_last_half(b, api, redis)
            async with running_app(settings) as fresh:
                k = b.keys(sid)
                available_at_start = int(await b.redis.hget(k.sale, "available") or -1)
                after = await burst(fresh.base, sid, _reqs("after", 5))
            final = await audit(b, sid)
    finally:
        redis.kill9()
    figures.update(available_at_start=available_at_start, ledger_after=final.ledger, **lost)
    assert available_at_start == 0
    assert Counter(s for _r, s, _b in after) == {409: 5}
    assert final.ledger["consistent"] is True, final.ledger
