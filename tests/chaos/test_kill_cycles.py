"""50 kill -9 cycles across the front, the consumer and the compensator, under load.

Three real children: ``python -m flashsale serve`` (HTTP on a free port),
``python -m flashsale consume`` and ``python -m flashsale compensate``, on
the machine's Redis (the test's key prefix) and a database of the test's
own. Buyers reserve at a steady rate with fresh keys and retry a transport
error or a 5xx with the same key until decided; one accepted order in five
is cancelled by its buyer (retried the same way); holds last 2 s, so the
compensator expires orders all the time. Each cycle picks one of the three
(a shuffled deck, each about a third of the time), kill -9s it, starts it
again; cycles are 0.2-0.8 s apart, and a child is killed again only once it
works (the front answers /healthz, the others have opened their PostgreSQL
pools): every kill lands on a working process, under load.

Afterwards (all three alive, buyers done, stream drained, every hold
released) each accepted order is classified from PostgreSQL and the
dead-letter stream: *persisted* (a row, any status but failed),
*compensated* (failed or dead-lettered), *lost* (neither), *duplicated*
(a key with more than one live order), *unexpected* (an order no buyer was
told about). Checked: lost 0, duplicated 0, unexpected 0, every key
resolved, each cancel that answered 200 is ``cancelled``, one release per
released order, stock back exactly once (``available`` = stock), the
ledger consistent.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientError, ClientSession, ClientTimeout

from flashsale.config import Settings
from flashsale.core.backends import Backends
from flashsale.run.embedded.servers import free_port
from tests.chaos.conftest import Figures
from tests.chaos.faultkit import Buy, Buyers, KeyHistory, ms, percentile, wait_http
from tests.chaos.harness import (
    Service,
    Services,
    audit,
    flashsale_env,
    unacked,
    wait_drained,
)
from tests.chaos.history import History, HttpReader
from tests.support import ADMIN_TOKEN

pytestmark = pytest.mark.chaos

CYCLES = int(os.environ.get("CHAOS_KILL_CYCLES", "50"))
RATE_PER_S = 80
STOCK = 1_000_000
HOLD_S = 2
CANCEL_ONE_IN = 5
USERS = 1000


class Cancels:
    """Cancels some accepted orders, each retried until decided."""

    def __init__(self, base: str, buyers: Buyers) -> None:
        self.base = base
        self.buyers = buyers
        self.answers: Counter[str] = Counter()
        self.cancelled: set[str] = set()  # answered 200
        self.refused: set[str] = set()  # answered 409 (expired first, or an earlier try won)
        self._tasks: set[asyncio.Task[None]] = set()

    def on_accepted(self, h: KeyHistory) -> None:
        f = h.final
        if f is None or f.status != 202 or hash(f.order_id) % CANCEL_ONE_IN:
            return
        task = asyncio.create_task(self._cancel(f.order_id, h.buy.user))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel(self, order_id: str, user: str) -> None:
        await asyncio.sleep(random.uniform(0.0, HOLD_S * 1.2))  # some race the expiry
        headers = {"Authorization": f"Bearer {self.buyers.token(user)}"}
        async with ClientSession(timeout=ClientTimeout(total=10)) as s:
            for _ in range(400):
                try:
                    async with s.post(
                        f"{self.base}/api/v1/orders/{order_id}/cancel", headers=headers
                    ) as r:
                        body: Any = await r.json(content_type=None)
                        code = body.get("error", {}).get("code", "") if r.status != 200 else ""
                        self.answers[f"{r.status}:{code}" if code else str(r.status)] += 1
                        if r.status == 200:
                            self.cancelled.add(order_id)
                            return
                        if r.status == 409:
                            self.refused.add(order_id)
                            return
                        if r.status < 500 and r.status != 429:
                            return
                except (ClientError, OSError, TimeoutError):
                    self.answers["transport"] += 1
                await asyncio.sleep(0.1)

    async def wait(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks))


class TrackingBuyers(Buyers):
    """Buyers that hand every accepted key to the cancels."""

    cancels: Cancels | None = None

    async def buy(self, buy: Buy) -> KeyHistory:
        h = await super().buy(buy)
        if self.cancels is not None:
            self.cancels.on_accepted(h)
        return h


def _start(svc: Service, dsn: str) -> None:
    """Start ``svc`` with a PostgreSQL application_name naming this very start."""
    svc.env["FLASHSALE_DATABASE_URL"] = f"{dsn}?application_name={_app_name(svc, 1)}"
    svc.start()


def _app_name(svc: Service, ahead: int = 0) -> str:
    return f"{svc.name}-{svc.starts + ahead}"


async def _ready(svc: Service, base: str, b: Backends) -> float:
    """Seconds from start until the child works: the front answers /healthz; a
    consumer or compensator has connected to PostgreSQL (its pool is open)."""
    if svc.command == "serve":
        return await wait_http(f"{base}/healthz", timeout_s=30)
    name = _app_name(svc)
    while True:
        n = await b.pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name
        )
        if int(n) >= 1:
            return time.monotonic() - svc.started_at
        if not svc.alive:
            raise AssertionError(f"{svc.name} exited: {svc.log_tail()}")
        if time.monotonic() - svc.started_at > 30:
            raise AssertionError(f"{svc.name} did not connect in 30 s")
        await asyncio.sleep(0.02)


async def _create_sale(base: str) -> str:
    async with ClientSession() as s, s.post(
        f"{base}/api/v1/sales", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        json={"sku": "KILL-1", "name": "kill cycles", "price_cents": 100, "stock": STOCK,
              "per_user_limit": 1000, "hold_seconds": HOLD_S},
    ) as r:
        body: Any = await r.json()
        assert r.status == 201, body
        return str(body["sale_id"])


async def _unsettled(b: Backends, sale_id: str, accepted: int) -> dict[str, int]:
    """What is left before every accepted order is persisted and released."""
    a = await audit(b, sale_id)
    left = {
        "stream": a.stream_len + a.xpending + a.pending, "holds": a.holds,
        "rows_missing": max(0, accepted - len(a.rows) - len(a.dead_lettered)),
        "unreleased": sum(
            1 for s, _q in a.rows.values() if s not in ("expired", "cancelled", "failed")
        ),
        "outbox": sum(1 for _r, done in a.releases.values() if not done),
    }
    return {k: v for k, v in left.items() if v}


async def test_kill9_cycles_front_consumer_compensator(
    chaos_settings: Settings, direct: Backends, services: Services, figures: Figures,
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    figures["seed"] = seed
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = flashsale_env(chaos_settings, tmp_path, FLASHSALE_PORT=str(port))
    front = services.add("serve", env, name="front")
    consumer = services.add("consume", env, name="consumer")
    compensator = services.add("compensate", env, name="compensator")
    assert chaos_settings.database_url
    for svc in (front, consumer, compensator):
        _start(svc, chaos_settings.database_url)
    await wait_http(f"{base}/readyz", timeout_s=30)
    sid = await _create_sale(base)

    deck = [front, consumer, compensator] * (CYCLES // 3 + 1)
    rnd.shuffle(deck)
    deck = deck[:CYCLES]
    restart_s: dict[str, list[float]] = {"front": [], "consumer": [], "compensator": []}
    keys = (f"kc-{i}" for i in range(10**9))
    buys = (Buy(f"buyer-{i % USERS}", k) for i, k in enumerate(keys))
    loop = asyncio.get_running_loop()
    async with TrackingBuyers(
        base, sid, concurrency=128, timeout_s=10, retry_sleep_s=0.2
    ) as buyers:
        cancels = Cancels(base, buyers)
        buyers.cancels = cancels
        history = History()
        buyers.history = history
        buyers.give_up_at = time.monotonic() + 600
        stop = asyncio.Event()
        load = asyncio.create_task(buyers.paced(buys, RATE_PER_S, stop))
        await asyncio.sleep(1.0)
        cycles_started = loop.time()
        starting: dict[str, asyncio.Task[float]] = {}
        mid_work: Counter[str] = Counter()
        for victim in deck:
            await asyncio.sleep(rnd.uniform(0.2, 0.8))  # everything at work, under load
            if victim.name in starting:  # kill a child that works, not one still starting
                restart_s[victim.name].append(await starting.pop(victim.name))
            dead_names = victim.consumer_names if victim is consumer else []
            victim.kill9()
            _start(victim, chaos_settings.database_url)
            if dead_names:  # what the dead consumers had read and not acked
                pend = await unacked(direct, sid, dead_names, count=10_000)
                mid_work["consumer_entries_unacked_at_kill"] += len(pend)
                mid_work["consumer_kills_mid_batch"] += bool(pend)
            elif victim is compensator:  # releases committed, not yet done in Redis
                n = await direct.pg.fetchval(
                    "SELECT count(*) FROM releases WHERE sale_id = $1 "
                    "AND redis_released_at IS NULL", sid,
                )
                mid_work["compensator_open_releases_at_kill"] += int(n)
            starting[victim.name] = asyncio.create_task(_ready(victim, base, direct))
            for svc in (front, consumer, compensator):
                assert svc.alive, f"{svc.name} died on its own: {svc.log_tail()}"
        for name, task in starting.items():
            restart_s[name].append(await task)
        cycles_s = loop.time() - cycles_started
        await asyncio.sleep(1.0)
        stop.set()
        await load
        await cancels.wait()
    accepted_keys = buyers.accepted()
    drain_s = await wait_drained(direct, sid, timeout_s=60)
    settle_started = loop.time()
    while left := await _unsettled(direct, sid, len(accepted_keys)):
        assert loop.time() - settle_started < 60, f"not settled within 60 s: {left}"
        await asyncio.sleep(0.2)
    settle_s = loop.time() - settle_started
    for svc in (front, consumer, compensator):
        assert svc.alive, f"{svc.name} died on its own: {svc.log_tail()}"
    verdict = await history.check(HttpReader(direct, base, ADMIN_TOKEN), sales=[sid])
    a = await audit(direct, sid)
    live_per_key = await direct.pg.fetch(
        "SELECT user_id, idempotency_key, count(*) AS n FROM orders WHERE sale_id = $1 "
        "AND status <> 'failed' GROUP BY user_id, idempotency_key HAVING count(*) > 1", sid,
    )
    release_rows = await direct.pg.fetchval(
        "SELECT count(*) FROM releases WHERE sale_id = $1", sid
    )

    # -- the history, classified ---------------------------------------------
    accepted = set(accepted_keys)
    dead = {o for o in a.dead_lettered if o}
    failed = {o for o, (s, _q) in a.rows.items() if s == "failed"}
    persisted = set(a.rows) - failed
    compensated = failed | dead
    lost = accepted - persisted - compensated
    unexpected = (set(a.rows) | dead) - accepted
    duplicated = len(live_per_key)
    released = {o for o, (s, _q) in a.rows.items() if s in ("expired", "cancelled", "failed")}
    cancelled_wrong = {o for o in cancels.cancelled if a.rows.get(o, ("", 0))[0] != "cancelled"}
    attempts = buyers.all_attempts()
    lat = [x.latency_s for x in attempts]
    kills = Counter(v.name for v in deck)
    figures.update(
        cycles=len(deck), cycles_s=round(cycles_s, 1), kills=dict(kills),
        restart_ready_s={
            k: {"mean": round(sum(v) / max(1, len(v)), 2), "max": round(max(v, default=0), 2)}
            for k, v in restart_s.items()
        },
        keys=len(buyers.keys), attempts=len(attempts), statuses=buyers.statuses(),
        accepted=len(accepted), rows_released=len(released), dead_lettered=len(dead),
        lost=verdict.lost, duplicated=verdict.duplicated, unexpected=verdict.unexpected,
        unresolved=len(buyers.unresolved()), replay_mismatches=len(buyers.mismatched()),
        requests_cut_by_a_front_kill=buyers.count("transport")
        - buyers.count("transport:ClientConnectorError"),
        kills_mid_work=dict(mid_work),
        server_errors_not_503=buyers.server_errors_not_503(),
        final_status=a.status_counts(), cancel_answers=dict(cancels.answers),
        releases=int(release_rows), history=verdict.figures(), p99_ms=ms(percentile(lat, 99)),
        drain_s=round(drain_s, 2), settle_s=round(settle_s, 2), ledger=a.ledger,
    )
    print(
        f"\nkill -9 cycles: {len(deck)} in {cycles_s:.0f}s {dict(kills)}; keys "
        f"{len(buyers.keys)}, accepted {len(accepted)} (history: persisted {verdict.persisted}, "
        f"compensated {verdict.compensated}, lost {verdict.lost}, duplicated "
        f"{verdict.duplicated}, unexpected {verdict.unexpected}); unresolved "
        f"{len(buyers.unresolved())}; "
        f"statuses {buyers.statuses()}; ledger consistent {a.ledger['consistent']}"
    )

    assert len(deck) == CYCLES and min(kills.values()) >= CYCLES // 3 - 1, kills
    verdict.assert_valid()  # the history checker: lost, duplicated, unexpected 0, ...
    assert buyers.unresolved() == [] and not buyers.mismatched()
    assert buyers.server_errors_not_503() == 0, buyers.statuses()
    assert not lost, f"lost {len(lost)}: {sorted(lost)[:5]}"
    assert duplicated == 0
    assert not unexpected, f"orders nobody was told about: {sorted(unexpected)[:5]}"
    assert not persisted & compensated
    assert not cancelled_wrong, f"cancel answered 200, order not cancelled: {cancelled_wrong}"
    assert int(release_rows) == len(released), "an order released zero or several times"
    assert a.available == STOCK, "stock not back exactly once"
    assert a.sold == 0 and a.drained
    assert a.ledger["consistent"] is True, a.ledger
