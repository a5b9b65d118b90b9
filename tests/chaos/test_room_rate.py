"""The waiting room's admission rate for the whole sale (issue 12), measured
over 20 s: admit_per_s = 50, 5,000 waiting, two admitters in two real
``flashsale compensate`` processes (the admitter runs in the compensator's
process, whatever the number of fronts), one of them killed with SIGKILL half
way. The token bucket is in Redis: the two together admit at the rate, and the
survivor keeps it. Measured from the room's own log (each step's Redis-side
stamp and count): within +-5 %. The normal suite's short variant is
tests/integration/test_waiting_room.py::test_rate_with_two_admitters_short.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import pytest

from flashsale.config import Settings
from flashsale.core.backends import Backends
from flashsale.room import keys as rk
from flashsale.room.tickets import new_ticket_id
from flashsale.web.app import Workers
from tests.chaos.conftest import Figures
from tests.chaos.harness import Services, flashsale_env
from tests.integration.test_waiting_room import measured_rate
from tests.support import eventually, running_app

pytestmark = pytest.mark.chaos


async def admitted_total(b: Backends, sid: str) -> int:
    return int(await b.redis.hget(b.keys(sid).room, "admitted_total") or 0)


async def sample(b: Backends, sid: str) -> tuple[float, int]:
    """(Redis's clock in s, tickets admitted so far)."""
    secs, micros = await b.redis.time()
    return secs + micros / 1e6, await admitted_total(b, sid)

RATE = 50
WAITING = 5000
MEASURE_S = 20.0


async def test_rate_over_20_s_with_two_admitter_processes_one_killed(
    chaos_settings: Settings, direct: Backends, services: Services, figures: Figures,
    tmp_path: Path,
) -> None:
    async with running_app(chaos_settings, Workers()) as api:  # a front, no admitter in it
        sale = await api.create_sale(stock=100_000, waiting_room={
            "admit_per_s": RATE, "pass_seconds": 600})
        sid = sale["sale_id"]
        k = direct.keys(sid)
        now = int(time.time() * 1000)
        for start in range(0, WAITING, 500):
            async with direct.redis.pipeline(transaction=False) as pipe:
                for i in range(start, start + 500):
                    await direct.scripts.room_join(
                        keys=rk.join_keys(k),
                        args=[now, f"w-{i}", new_ticket_id(), secrets.randbits(53), 10**6,
                              120_000],
                        client=pipe,  # type: ignore[arg-type]
                    )
                await pipe.execute()
        env = flashsale_env(chaos_settings, tmp_path)
        c1 = services.add("compensate", env, name="c1")
        c2 = services.add("compensate", env, name="c2")
        c1.start()
        c2.start()
        await eventually(lambda: admitted_total(direct, sid), 30)
        await asyncio.sleep(1.0)
        t0, n0 = await sample(direct, sid)
        await asyncio.sleep(MEASURE_S / 2)
        c2.kill9()
        await asyncio.sleep(MEASURE_S / 2)
        t1, n1 = await sample(direct, sid)
        await c1.stop()
    rate, admitted = (n1 - n0) / (t1 - t0), n1 - n0
    log_rate, _ = await measured_rate(direct, sid, 1.0)  # the last 256 steps, cross-check
    assert abs(log_rate - RATE) <= 0.05 * RATE, log_rate
    figures.update(admit_per_s=RATE, waiting=WAITING, measured_per_s=round(rate, 2),
                   admitted=admitted, error_pct=round(100 * (rate - RATE) / RATE, 2))
    assert abs(rate - RATE) <= 0.05 * RATE, rate
