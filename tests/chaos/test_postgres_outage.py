"""PostgreSQL unreachable for 10 s under load.

The machine's PostgreSQL is shared, so it is not stopped: a TcpProxy sits
between flashsale (the front in-process, the consumer as a child) and
PostgreSQL, and ``cut()`` resets every link and refuses new ones for 10 s.

Checked: reservations keep being accepted (they only need Redis), the stream
buffers them, ``/readyz`` answers 503 naming postgres, and after ``heal()``
the same consumer process resumes by itself; every accepted order ends
persisted (none failed, none dead-lettered), the ledger is consistent. The
figure: how long the backlog took to drain after PostgreSQL came back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import pytest

from flashsale.config import Settings
from flashsale.core.backends import Backends
from tests.chaos.conftest import Figures
from tests.chaos.faults import TcpProxy
from tests.chaos.harness import (
    HOLDING,
    LoadGenerator,
    Services,
    audit,
    consumer_joined,
    flashsale_env,
    wait_drained,
)
from tests.support import eventually, running_app

OUTAGE_S = 10.0
RATE_PER_S = 150
STOCK = 100_000

pytestmark = pytest.mark.chaos


async def _readyz(api: Any) -> tuple[int, dict[str, Any]]:
    status, body, _ = await api.request("GET", "/readyz")
    assert isinstance(body, dict)
    return status, body


async def _persisted(b: Backends, order_ids: list[str]) -> int:
    n = await b.pg.fetchval(
        "SELECT count(*) FROM orders WHERE order_id = ANY($1::text[])", order_ids
    )
    return int(n)


async def test_postgres_unreachable_10s_under_load(
    chaos_settings: Settings, direct: Backends, services: Services, figures: Figures,
    tmp_path: Any,
) -> None:
    assert chaos_settings.database_url
    pg = urlsplit(chaos_settings.database_url)
    assert pg.hostname and pg.port
    loop = asyncio.get_running_loop()
    async with TcpProxy(pg.hostname, pg.port) as proxy:
        proxied = replace(chaos_settings, database_url=proxy.url(chaos_settings.database_url))
        async with running_app(proxied) as api:
            sid = (await api.create_sale(stock=STOCK, per_user_limit=1000, hold_seconds=3600))[
                "sale_id"
            ]
            consumer = services.add("consume", flashsale_env(proxied, tmp_path))
            consumer.start()
            pid = consumer.pid
            load = LoadGenerator(
                api.base, sid, rate_per_s=RATE_PER_S, users=500, user_prefix="buyer"
            )
            stop = asyncio.Event()
            load_task = asyncio.create_task(load.run(stop))
            # a consumer shows in the group once it has read an entry
            await eventually(lambda: consumer_joined(direct, sid, consumer), timeout_s=20)
            await asyncio.sleep(1.0)
            assert (await _readyz(api))[0] == 200

            # -- the outage ---------------------------------------------------
            accepted_before_cut = len(load.stats.accepted)
            proxy.cut()
            cut_at = loop.time()
            readyz: list[tuple[int, dict[str, Any]]] = []
            backlog_max = 0
            while loop.time() - cut_at < OUTAGE_S:
                if len(readyz) < 3 and loop.time() - cut_at > 1.0 + 3 * len(readyz):
                    readyz.append(await _readyz(api))
                length = int(await direct.redis.xlen(direct.keys(sid).stream))
                backlog_max = max(backlog_max, length)
                await asyncio.sleep(0.2)
            accepted_in_outage = len(load.stats.accepted) - accepted_before_cut
            backlog = list(load.stats.accepted)
            persisted_at_heal = await _persisted(direct, backlog)

            # -- heal: the same consumer resumes by itself ----------------------
            proxy.heal()
            healed_at = time.monotonic()
            ready_task = asyncio.create_task(
                eventually(lambda: _ready_ok(api), timeout_s=10, interval_s=0.1)
            )
            drain_s = -1.0
            while time.monotonic() - healed_at < 60:
                if await _persisted(direct, backlog) == len(backlog):
                    drain_s = time.monotonic() - healed_at
                    break
                await asyncio.sleep(0.05)
            ready_after = await ready_task
            await asyncio.sleep(1.0)  # a little more load after the outage
            stop.set()
            await load_task
            final_drain_s = await wait_drained(direct, sid, timeout_s=60)
            assert consumer.alive and consumer.pid == pid, "the consumer had to be restarted"
            assert await consumer.stop() == 0, consumer.log_tail()
        a = await audit(direct, sid)

    accepted = set(load.stats.accepted)
    persisted = {o for o, (s, _q) in a.rows.items() if s in HOLDING}
    figures.update(
        outage_s=OUTAGE_S, accepted=len(accepted), accepted_during_outage=accepted_in_outage,
        stream_backlog_max=backlog_max, persisted_when_healed=persisted_at_heal,
        backlog_when_healed=len(backlog) - persisted_at_heal,
        drain_after_heal_s=round(drain_s, 2),
        readyz_ok_after_heal_s=round(ready_after - healed_at, 2),
        readyz_during_outage=[(s, b.get("checks")) for s, b in readyz],
        final_drain_s=round(final_drain_s, 2), persisted=len(persisted),
        failed=a.status_counts().get("failed", 0), dead_lettered=len(a.dead_lettered),
        proxy={"refused": proxy.stats.refused, "reset": proxy.stats.reset},
        load=load.stats.figures(), ledger=a.ledger,
    )
    print(f"\npostgres outage {OUTAGE_S:.0f}s: accepted {len(accepted)} "
          f"({accepted_in_outage} during the outage), backlog max {backlog_max}, "
          f"drained {drain_s:.2f}s after heal, readyz ok after {ready_after - healed_at:.2f}s")

    assert set(load.stats.statuses) == {"202"}, load.stats.statuses
    assert accepted_in_outage >= RATE_PER_S * OUTAGE_S * 0.5, "reservations stalled"
    assert backlog_max >= accepted_in_outage * 0.9, "the stream did not buffer the outage"
    assert readyz and all(s == 503 for s, _b in readyz), readyz
    for _s, body in readyz:
        assert body["status"] == "unavailable"
        assert body["checks"]["postgres"].startswith("error"), body
        assert body["checks"]["redis"] == "ok", body
    assert ready_after
    assert drain_s >= 0, "the backlog was not persisted within 60 s of the heal"
    assert persisted == accepted, f"lost {len(accepted - persisted)}"
    assert not a.dead_lettered and "failed" not in a.status_counts()
    assert a.drained
    assert a.sold == a.holding_qty
    assert a.ledger["consistent"] is True, a.ledger


async def _ready_ok(api: Any) -> float | None:
    """Seconds since the heal once /readyz answers 200, else None."""
    status, _body, _ = await api.request("GET", "/readyz")
    return time.monotonic() if status == 200 else None
