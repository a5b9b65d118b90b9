"""Admission control: per-buyer rate limit (429 + Retry-After), load shedding
when a sale's waiting line is full (503 overloaded, nothing reserved)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import replace

from flashsale.config import Settings
from tests.support import running_app


async def test_scalper_is_rate_limited_and_never_passes_the_limit(settings: Settings) -> None:
    limited = replace(settings, rate_user_per_s=5.0, rate_user_burst=10.0)
    async with running_app(limited) as api:
        sid = (await api.create_sale(stock=1000, per_user_limit=3))["sale_id"]
        started = time.monotonic()
        results = await asyncio.gather(
            *(api.reserve(sid, "scalper", 1, key=f"s-{i}") for i in range(200))
        )
        refilled = 5.0 * (time.monotonic() - started)  # the bucket refills while they run
        codes = Counter(status for status, _ in results)
        assert codes[202] == 3, codes  # the per-user limit, decided in Redis
        admitted = codes[202] + codes[409]
        assert admitted <= 10 + refilled and codes[429] == 200 - admitted, codes
        status, body, resp = await api.request(
            "POST", f"/api/v1/sales/{sid}/orders", json={}, headers=api.buyer("scalper")
        )
        assert status == 429 and body["error"]["code"] == "rate_limited"
        assert int(resp.headers["Retry-After"]) >= 1
        # a calm buyer is unaffected
        assert (await api.reserve(sid, "calm", 1))[0] == 202
        led = await api.ledger(sid)
        assert led["available"] == 1000 - 4 and led["pending"] == 4


async def test_full_waiting_line_sheds_load_without_reserving(settings: Settings) -> None:
    tight = replace(settings, reserve_queue_max=5, reserve_inflight_batches=1)
    async with running_app(tight) as api:
        sid = (await api.create_sale(stock=1000, per_user_limit=1))["sale_id"]
        results = await asyncio.gather(*(api.reserve(sid, f"b{i}", 1) for i in range(300)))
        codes = Counter(status for status, _ in results)
        assert set(codes) <= {202, 503}, codes
        shed = [body for status, body in results if status == 503]
        assert shed and all(b["error"]["code"] == "overloaded" for b in shed)
        led = await api.ledger(sid)
        assert led["available"] == 1000 - codes[202] and led["pending"] == codes[202]
