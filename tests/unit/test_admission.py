"""Admission control: the per-buyer bucket, the held 429 (tarpit), no GC garbage."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time

import pytest

from flashsale.errors import RateLimited
from flashsale.web.admission import Admission, BuyerRateLimited


def test_a_buyer_past_the_burst_is_limited_with_retry_after_and_a_delay() -> None:
    adm = Admission(user_rate_per_s=1.0, user_burst=3.0, global_rate_per_s=0.0,
                    limited_delay_s=0.7)
    for _ in range(3):
        adm.admit("scalper")
    with pytest.raises(BuyerRateLimited) as info:
        adm.admit("scalper")
    assert info.value.retry_after_s == 1 and info.value.delay_s == 0.7
    adm.admit("calm")  # another buyer has their own bucket


def test_the_global_limit_is_not_held() -> None:
    adm = Admission(user_rate_per_s=0.0, user_burst=1.0, global_rate_per_s=1.0,
                    limited_delay_s=5.0)
    adm.admit("a")
    with pytest.raises(RateLimited) as info:
        adm.admit("b")
    assert not isinstance(info.value, BuyerRateLimited)


async def test_hold_waits_a_jittered_delay_and_is_bounded() -> None:
    adm = Admission(user_rate_per_s=1.0, user_burst=1.0, global_rate_per_s=0.0,
                    limited_delay_s=0.2, delayed_max=3)
    adm.admit("s")
    excs = []
    for _ in range(5):
        with pytest.raises(BuyerRateLimited) as info:
            adm.admit("s")
        excs.append(info.value)
    started = time.monotonic()
    held = [asyncio.create_task(adm.hold(e)) for e in excs[:3]]
    await asyncio.sleep(0)
    assert adm.delayed == 3
    await adm.hold(excs[3])  # past delayed_max: at once
    assert time.monotonic() - started < 0.09
    await asyncio.gather(*held)
    assert 0.09 <= time.monotonic() - started <= 0.6
    assert adm.delayed == 0


def test_a_refusal_leaves_no_cyclic_garbage() -> None:
    adm = Admission(user_rate_per_s=1.0, user_burst=1.0, global_rate_per_s=0.0,
                    limited_delay_s=1.0)
    adm.admit("s")
    gc.collect()
    gc.disable()
    try:
        for _ in range(100):
            with contextlib.suppress(BuyerRateLimited):
                adm.admit("s")
        assert gc.collect() == 0
    finally:
        gc.enable()
