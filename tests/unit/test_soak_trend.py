"""The soak's Redis verdict: growth that the live state does not explain."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

from bench.soak import MB, redis_trend


def _result(points: list[tuple[float, int, float]]) -> Any:
    samples = [
        SimpleNamespace(phase="load", t_s=t, holds=items // 2, idem_keys=items - items // 2,
                        redis_used_mb=mb)
        for t, items, mb in points
    ]
    return SimpleNamespace(samples=samples, opts=SimpleNamespace(load_s=300.0))


def test_memory_that_follows_the_live_state_is_flat() -> None:
    # throughput varies: live items swing by +-30 %, 200 bytes each, no leak
    pts = [(150.0 + 5 * i, int(300_000 * (1 + 0.3 * math.sin(i))), 0.0) for i in range(31)]
    pts = [(t, n, 1.0 + 5.0 + n * 200 / MB) for t, n, _ in pts]
    v = redis_trend(_result(pts), base_mb=1.0)
    assert v["flat"] is True
    assert abs(v["slope_mb_per_min"]) < 1e-6
    assert abs(v["bytes_per_live_item"] - 200) < 0.5


def test_a_leak_under_a_swinging_live_state_is_found() -> None:
    # the same swing plus 1.2 MB per minute that no live item accounts for
    pts = [(150.0 + 5 * i, int(300_000 * (1 + 0.3 * math.sin(i)))) for i in range(31)]
    mb = [(t, n, 1.0 + 5.0 + n * 200 / MB + 0.02 * (t - 150)) for t, n in pts]
    v = redis_trend(_result(mb), base_mb=1.0)
    assert v["flat"] is False
    assert abs(v["slope_mb_per_min"] - 1.2) < 1e-3
