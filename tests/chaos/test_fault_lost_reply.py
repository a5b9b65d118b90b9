"""The reply is lost after the reservation ran; the buyer retries with the same key.

A TcpProxy sits between the HTTP front (in-process, ``redis_timeout_s`` =
0.3 s) and Redis. During a burst of reservations (waves of 60 every 0.2 s)
it alternates:
normal traffic, then a window in which every request still reaches Redis (the
reservation script RUNS) but every reply is swallowed — the front times out —
after which the links that lost a reply are reset; and every other window a
few replies are dropped with an immediate reset instead. The front then asks
Redis (resolve_orders, on fresh connections, for up to
``reserve_resolve_s``) which of the batch's order ids were reserved: those
are answered 202, the others are voided and answered 503 "nothing reserved"
(true: a late copy of the request reserves nothing). Each buyer retries a
503 / transport error with the same key until decided; one request in six
has no key and is sent once.

Checked: every key resolved (a 202 or a decided 409), each key has exactly
one order when it got a 202 and none otherwise (PostgreSQL after the drain,
and the holds in Redis), a retried key got the same order id every time,
accepted <= stock, the ledger consistent; and the contract's 503 (nothing
reserved): no order row a 503 cannot explain, no 503 after which stock stays
held (keyless included), and a reservation that ran while its reply was lost
only ever hidden behind a 503 that said "outcome unknown, retry with the same
key". The figures count the reservations that ran while their reply was lost
and were answered 202 after the lookup, and the order ids voided.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from urllib.parse import urlsplit

import pytest

from flashsale.config import Settings
from flashsale.core.backends import Backends
from tests.chaos.conftest import Figures
from tests.chaos.faultkit import (
    Buy,
    Buyers,
    DirectReader,
    drain,
    ms,
    orders_per_key,
    percentile,
)
from tests.chaos.faults import TcpProxy
from tests.chaos.harness import audit
from tests.chaos.history import HOLDING, Fate, History
from tests.support import running_app

pytestmark = pytest.mark.chaos

KEYS = 1800
USERS = 900  # two keys each
STOCK = 1400  # the last ~400 keys are sold out
RATE_PER_S = 300
WAVE = 60  # keys sent at once, every WAVE / RATE_PER_S seconds
KEYLESS_ONE_IN = 6  # one request in 6 has no Idempotency-Key: sent once, never retried
REDIS_TIMEOUT_S = 0.3
NORMAL_S = 0.3
SWALLOW_S = 0.6  # > REDIS_TIMEOUT_S: the front gives up while Redis has done the work


async def _faults(proxy: TcpProxy, stop: asyncio.Event, counts: dict[str, int]) -> None:
    cycle = 0
    while not stop.is_set():
        await asyncio.sleep(NORMAL_S)
        cycle += 1
        if cycle % 2:
            proxy.swallow_replies()
            counts["swallow_windows"] += 1
            await asyncio.sleep(SWALLOW_S)
            proxy.swallow_replies(False)
        else:
            proxy.drop_reply_once(3)
            counts["drop_windows"] += 1
            await asyncio.sleep(SWALLOW_S)
    proxy.swallow_replies(False)


def _logged(caplog: pytest.LogCaptureFixture, field: str) -> int:
    """Sum of a count flashsale/core/resolve.py logs on each lost reply it resolves."""
    return sum(
        int(getattr(r, field, 0)) for r in caplog.records if r.name == "flashsale.core.resolve"
    )


async def test_lost_reply_retry_same_key_one_reservation(
    chaos_settings: Settings, direct: Backends, figures: Figures,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="flashsale.core.resolve")
    assert chaos_settings.redis_url
    r = urlsplit(chaos_settings.redis_url)
    assert r.hostname and r.port
    async with TcpProxy(r.hostname, r.port) as proxy:
        s = replace(
            chaos_settings, redis_url=proxy.url(chaos_settings.redis_url),
            redis_timeout_s=REDIS_TIMEOUT_S,
        )
        async with running_app(s) as api:
            sid = (await api.create_sale(stock=STOCK, per_user_limit=2, hold_seconds=3600))[
                "sale_id"
            ]
            buys = [
                Buy(f"anon-{i}", f"nokey-{i}", send_key=False) if i % KEYLESS_ONE_IN == 0
                else Buy(f"buyer-{i % USERS}", f"lr-{i}")
                for i in range(KEYS)
            ]
            counts = {"swallow_windows": 0, "drop_windows": 0}
            history = History()
            async with Buyers(api.base, sid, concurrency=128) as buyers:
                buyers.history = history
                buyers.give_up_at = time.monotonic() + 90
                stop = asyncio.Event()
                faults = asyncio.create_task(_faults(proxy, stop, counts))
                started = time.monotonic()
                waves = []
                for i in range(0, KEYS, WAVE):  # flash-sale traffic comes in waves
                    waves.append(asyncio.create_task(buyers.burst(buys[i : i + WAVE])))
                    await asyncio.sleep(WAVE / RATE_PER_S)
                await asyncio.gather(*waves)
                stop.set()
                await faults
                burst_s = time.monotonic() - started
        drain_s = await drain(direct, sid)
        verdict = await history.check(DirectReader(direct), sales=[sid])
        a = await audit(direct, sid)
        per_key = await orders_per_key(direct, sid)
        voided = int(await direct.redis.zcard(direct.keys(sid).void))
        created = {
            r["order_id"]: r["created_ms"] for r in await direct.pg.fetch(
                "SELECT order_id, (extract(epoch FROM created_at) * 1000)::bigint AS created_ms "
                "FROM orders WHERE sale_id = $1", sid,
            )
        }

    accepted = buyers.accepted()
    sold_out = [h for h in buyers.keys.values() if h.final and h.final.code == "sold_out"]
    saw_unknown = [h for h in buyers.keys.values() if any(x.kind == "unknown" for x in h.attempts)]
    # the reservation ran during an attempt that answered 503: its order is older
    # than the attempt that finally got the 202
    ran_unseen = [
        h for h in accepted.values()
        if created.get(h.final.order_id if h.final else "", 1 << 62)
        < int((h.final.started if h.final else 0) * 1000)
    ]
    unknown_codes: dict[str, int] = {}
    for x in buyers.all_attempts():
        if x.kind == "unknown":
            k = f"{x.status}:{x.code}" if x.code else str(x.status)
            unknown_codes[k] = unknown_codes.get(k, 0) + 1
    orders_for_key = {
        k: per_key.get((h.buy.user, k if h.buy.send_key else ""), [])
        for k, h in buyers.keys.items()
    }
    resolved_reserved = _logged(caplog, "resolved_reserved")
    unresolved_keyed = _logged(caplog, "unresolved_keyed")
    unresolved_keyless = _logged(caplog, "unresolved_keyless")
    # a 503 whose order stayed held (the contract: a 503 reserved nothing)
    held_behind_503 = [
        o for o in verdict.orders if o.fate is Fate.EXPLAINED and o.status in HOLDING
    ]
    released_by_front = int(await direct.pg.fetchval(
        "SELECT coalesce(sum(quantity), 0) FROM releases WHERE sale_id = $1 AND actor = $2",
        sid, "reserver",
    ))
    multi = {k: v for k, v in orders_for_key.items() if len(v) > 1}
    wrong = [
        k for k, h in buyers.keys.items()
        if h.final is not None and h.final.status == 202
        and orders_for_key[k] != [h.final.order_id]
    ]
    phantom = [
        k for k, h in buyers.keys.items()
        if h.final is not None and h.final.status != 202 and orders_for_key[k]
    ]
    latencies = [x.latency_s for x in buyers.all_attempts()]
    figures.update(
        keys=KEYS, burst_s=round(burst_s, 1), attempts=len(latencies),
        accepted=len(accepted), sold_out=len(sold_out), unresolved=len(buyers.unresolved()),
        keys_with_unknown_outcome=len(saw_unknown),
        reserved_while_client_heard_503=len(ran_unseen),
        reserved_reply_lost_answered_202=resolved_reserved, order_ids_voided=voided,
        unresolved_keyed=unresolved_keyed, unresolved_keyless_released=unresolved_keyless,
        released_by_front=released_by_front, held_behind_503=len(held_behind_503),
        unknown_attempts=unknown_codes, statuses=buyers.statuses(),
        keys_with_more_than_one_order=len(multi), keys_with_wrong_order=len(wrong),
        refused_keys_with_an_order=len(phantom), replay_mismatches=len(buyers.mismatched()),
        fault_windows=counts, replies_swallowed=proxy.stats.replies_swallowed,
        replies_dropped=proxy.stats.replies_dropped, links_reset=proxy.stats.reset,
        p50_ms=ms(percentile(latencies, 50)), p99_ms=ms(percentile(latencies, 99)),
        keyless_requests=sum(1 for b in buys if not b.send_key),
        keyless_unknown_that_reserved=verdict.explained_by_unknown,
        history=verdict.figures(), redis_holds=a.holds, drain_s=round(drain_s, 2),
        ledger=a.ledger,
    )
    print(
        f"\nlost replies: {KEYS} keys, {len(latencies)} attempts, accepted {len(accepted)}, "
        f"sold out {len(sold_out)}, unresolved {len(buyers.unresolved())}; "
        f"{len(saw_unknown)} keys heard 503/reset, {len(ran_unseen)} of them had reserved "
        f"(resolved by the retry); {resolved_reserved} reservations ran while their reply "
        f"was lost and got their 202 after the lookup, {voided} order ids voided; "
        f"orders per key > 1: {len(multi)}; "
        f"swallowed {proxy.stats.replies_swallowed}, dropped {proxy.stats.replies_dropped}, "
        f"reset {proxy.stats.reset}"
    )

    verdict.assert_valid()  # lost, duplicated, unexpected 0; ledger, holds, stream
    assert buyers.unresolved() == [], "a key ended without a decided outcome"
    assert buyers.server_errors_not_503() == 0 and buyers.missing_retry_after() == 0
    assert not buyers.mismatched(), "a retried key got another order id"
    assert not multi and not wrong and not phantom, (multi, wrong, phantom)
    assert sum(len(v) for v in per_key.values()) == len(accepted) + verdict.explained_by_unknown
    assert not held_behind_503, f"a 503 left its order holding stock: {held_behind_503[:5]}"
    # the stock sells out exactly (every key retried), but for what the front
    # released after a lost reply that no later buyer came back for
    assert STOCK - released_by_front <= verdict.sales[0].held <= STOCK, verdict.sales[0]
    assert {h.final.code for h in buyers.keys.values() if h.final and h.final.status != 202} <= {
        "sold_out"
    }
    assert resolved_reserved >= 1, "no reply was lost after its reservation ran"
    # a reservation that ran hid behind a 503 only where it said "outcome unknown,
    # retry with the same key" (the retry found it)
    assert len(ran_unseen) <= unresolved_keyed, (len(ran_unseen), unresolved_keyed)
    assert proxy.stats.replies_swallowed >= 1 and proxy.stats.replies_dropped >= 1
    assert a.holds == len(accepted), "every hold is an order some buyer was given"
    assert a.drained
    assert a.ledger["consistent"] is True, a.ledger
