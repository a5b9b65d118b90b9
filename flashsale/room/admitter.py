"""The admission loop: one per sale whatever the number of fronts.

It runs in the compensator's process (`flashsale compensate`, `flashsale up`),
so it keeps running when a front dies. Each step of each live sale with a room
is one script call (lua/room_admit-8.lua) whose token bucket lives in Redis,
so two admitters (two compensators) together still admit at the configured
rate. When the sale has nothing available, it checks whether any hold can
still come back and, if none can, closes the room (lua/room_close-3.lua):
every waiting ticket reads ``sold_out`` from the next poll on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.exceptions import RedisError, ResponseError

from flashsale.core import live_sales
from flashsale.core.backends import Backends
from flashsale.core.clients import as_text
from flashsale.room import keys as rk
from flashsale.room.results import AdmitCode, AdmitStep, CloseCode

log = logging.getLogger("flashsale.room.admitter")

BATCH_MAX = 2000  # admissions per script call; a step calls again while calls come back full
CALLS_PER_STEP_MAX = 10
SWEEP_MAX = 1000  # dropped tickets and lapsed passes retired per call
WINDOW_MS = 10_000  # the measured admission rate's window
SALES_REFRESH_S = 1.0
# orders that can still give their stock back once persisted: unpaid holds, and
# releases committed in PostgreSQL whose Redis step is still to do
_HOLDS_THAT_CAN_RETURN = """
SELECT (SELECT count(*) FROM orders WHERE sale_id = $1 AND status = 'awaiting_payment')
     + (SELECT count(*) FROM releases WHERE sale_id = $1 AND redis_released_at IS NULL)
"""


class Admitter:
    def __init__(self, backends: Backends) -> None:
        self._b = backends
        self._sales: list[str] = []
        self._sales_at = -SALES_REFRESH_S

    async def room_sales(self) -> list[str]:
        """The live sales (flashsale/core/live_sales.py) with a room, refreshed every second."""
        now = time.monotonic()
        if now - self._sales_at >= SALES_REFRESH_S:
            rows = await live_sales.rows(self._b)
            self._sales = [r["sale_id"] for r in rows if r["waiting_room"] is not None]
            self._sales_at = now
        return self._sales

    async def step(self, sale_id: str) -> int:
        """One admission step of one sale; returns how many it admitted."""
        k = self._b.keys(sale_id)
        total, last = 0, None
        for _ in range(CALLS_PER_STEP_MAX):
            got = AdmitStep.of(await self._b.scripts.room_admit(
                keys=rk.admit_keys(k),
                args=[int(time.time() * 1000), BATCH_MAX, SWEEP_MAX, WINDOW_MS],
            ))
            if isinstance(got, AdmitCode):  # no sale, or no room (any more)
                return total
            total, last = total + got.admitted, got
            if got.admitted < BATCH_MAX:
                break
        if last is not None and last.available <= 0 and not last.closed:
            await self.maybe_close(sale_id)
        return total

    async def maybe_close(self, sale_id: str) -> bool:
        """Close the room if no hold can come back (see lua/room_close-3.lua for
        why the order T0 Redis, T1 PostgreSQL, T2 script is enough)."""
        b, k = self._b, self._b.keys(sale_id)
        async with b.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(k.sale, "available", "pending")
            pipe.xinfo_stream(k.stream)
            got = await pipe.execute(raise_on_error=False)
        hm, info = got
        if isinstance(hm, Exception):
            raise hm
        if hm[0] is None or int(hm[0]) != 0 or int(hm[1] or 0) != 0:
            return False
        if isinstance(info, ResponseError):  # no stream (yet)
            last = ""
        elif isinstance(info, Exception):
            raise info
        else:
            last = as_text(info.get("last-generated-id", b""))
        if int(await b.pg.fetchval(_HOLDS_THAT_CAN_RETURN, sale_id)) != 0:
            return False
        done = CloseCode(int(await b.scripts.room_close(
            keys=rk.close_keys(k), args=[last, int(time.time() * 1000)]
        )))
        if done is CloseCode.CLOSED:
            log.info("waiting room of %s closed: sold out, no hold can come back", sale_id)
        return done is CloseCode.CLOSED

    async def run(self, stop: asyncio.Event) -> None:
        interval = self._b.settings.room_admit_interval_ms / 1000
        while not stop.is_set():
            try:
                for sale_id in await self.room_sales():
                    await self.step(sale_id)
            except (RedisError, OSError, Exception) as exc:  # keep admitting after a blip
                log.warning("admission step failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
