"""A scalper with 200 concurrent requests over many keys, and the calm buyers.

The front runs as a child (``python -m flashsale serve``) with the real
per-buyer rate limit (10/s, burst 20, 429s held ~1 s: the tarpit of
flashsale/web/admission.py), a consumer beside it, on a dedicated redis-server.
The scalper is a separate process: one buyer, 200 concurrent connections,
each sending reservation after reservation with a fresh Idempotency-Key
(hammering, never honouring Retry-After); it is a lean raw-socket client,
so that its own CPU on the shared cores stays small. Calm buyers — one request each,
80/s, from the test process — run throughout; the scalper is let loose
(SIGCONT) in 3 busy windows of 5 s, each right after a calm window of 4.5 s
(SIGSTOP), so that each busy figure has its calm figure measured just
before, and drift in the machine's load (2 shared cores) hits both alike.
Calm samples start 1.6 s into a calm window (the scalper's held answers
are still going out before that); busy samples 1 s into a busy window: the
scalper's first 200 requests land at once (the arrival wave), reported
apart (its max), the p99 compared is the steady state beside 200 hammering
connections.

Checked: the scalper gets at most the per-user limit (202s), the rest is 429
with Retry-After (or a decided 409), nothing else; every calm buyer gets a
202; the scalper's 429s are held (its request rate stays under what the
tarpit allows: at most 1.2 x 200 connections / 0.5 s); ledger consistent
after the drain. Figures: both p99s (calm alone and beside the scalper:
reported, not asserted, since on 2 shared cores they follow the machine's
other load), the scalper's request rate and the front's CPU share with and
without it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from flashsale import auth
from flashsale.config import Settings
from flashsale.core.backends import open_backends
from flashsale.run.embedded.servers import free_port
from tests.chaos.conftest import Figures
from tests.chaos.faultkit import Buy, Buyers, DurableRedis, ms, percentile, wait_http
from tests.chaos.harness import REPO, Services, audit, flashsale_env, wait_drained
from tests.support import ADMIN_TOKEN, JWT_SECRET

pytestmark = pytest.mark.chaos

PER_USER_LIMIT = 2
SCALPER_CONCURRENCY = 200
ROUNDS = 3
CALM_S = 4.5  # each busy window follows a calm one
BUSY_S = 5.0
ARRIVAL_S = 1.0  # the scalper's 200 first requests land at once: reported apart
WARM_S = 1.0
TARPIT_TAIL_S = 1.6  # held 429s (<= 1.5 s) still going out at the start of a calm window
CALM_RATE_PER_S = 80
RATE_USER_PER_S = 10
RATE_USER_BURST = 20
# each held 429 waits at least half the configured delay (jittered 0.5-1.5x)
TARPIT_MIN_S = 0.5
SCALPER_MAX_RPS = 1.2 * SCALPER_CONCURRENCY / TARPIT_MIN_S  # 20 % for its 202s/409s

SCALPER = r"""
import asyncio, json, signal, sys
from collections import Counter
from urllib.parse import urlsplit

# A cheap HTTP/1.1 client on raw keep-alive connections, so that the scalper's
# own CPU (on the same 2 cores as the front) stays small: the test measures
# what the front pays for it, not what the client pays.
async def main(url, token, concurrency):
    u = urlsplit(url)
    counts, retry_after_missing, seq = Counter(), 0, 0
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    body = b'{"quantity": 1}'

    async def worker():
        nonlocal retry_after_missing, seq
        reader = writer = None
        while not stop.is_set():
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(u.hostname, u.port)
                seq += 1
                writer.write(
                    f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                    f"Authorization: Bearer {token}\r\nIdempotency-Key: sc-{seq}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                    .encode() + body
                )
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                status = int(head.split(" ", 2)[1])
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:] if line)
                }
                payload = await reader.readexactly(int(headers.get("content-length", "0")))
                code = ""
                if status != 202:
                    code = json.loads(payload).get("error", {}).get("code", "")
                counts[f"{status}:{code}" if code else str(status)] += 1
                if status == 429 and not headers.get("retry-after", "").isdigit():
                    retry_after_missing += 1
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                counts["transport:" + type(exc).__name__] += 1
                writer = None

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"counts": counts, "retry_after_missing": retry_after_missing}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_scalper_gets_the_limit_and_calm_buyers_keep_their_p99(
    chaos_settings: Settings, services: Services, figures: Figures, tmp_path: Path,
) -> None:
    redis = DurableRedis(tmp_path / "redis", persistent=False)  # no other test's traffic
    redis.start()
    s = replace(chaos_settings, redis_url=redis.url)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = flashsale_env(
        s, tmp_path, FLASHSALE_PORT=str(port),
        FLASHSALE_RATE_USER_PER_S=str(RATE_USER_PER_S),
        FLASHSALE_RATE_USER_BURST=str(RATE_USER_BURST),
    )
    front = services.add("serve", env, name="front")
    front.start()
    services.add("consume", env, name="consumer").start()
    scalper: asyncio.subprocess.Process | None = None
    try:
        await wait_http(f"{base}/readyz", timeout_s=30)
        async with ClientSession() as session, session.post(
            f"{base}/api/v1/sales", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            json={"sku": "HYPE-1", "name": "limited drop", "price_cents": 25_000,
                  "stock": 100_000, "per_user_limit": PER_USER_LIMIT, "hold_seconds": 3600},
        ) as r:
            sale: Any = await r.json()
            assert r.status == 201, sale
        sid = str(sale["sale_id"])
        total_s = WARM_S + ROUNDS * (CALM_S + BUSY_S) + 0.5
        calm_n = int(CALM_RATE_PER_S * total_s)
        async with Buyers(base, sid, concurrency=64, timeout_s=10) as calm:
            for i in range(calm_n):  # tokens minted before the clock starts
                calm.token(f"calm-{i}")
            token = auth.mint(JWT_SECRET, "scalper", 3600)
            scalper = await asyncio.create_subprocess_exec(
                sys.executable, "-c", SCALPER, f"{base}/api/v1/sales/{sid}/orders", token,
                str(SCALPER_CONCURRENCY), cwd=REPO,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            scalper.send_signal(signal.SIGSTOP)  # born paused: it hammers in the busy windows
            load = asyncio.create_task(calm.paced(
                (Buy(f"calm-{i}", f"calm-{i}") for i in range(calm_n)), CALM_RATE_PER_S,
                asyncio.Event(),
            ))
            await asyncio.sleep(WARM_S)
            windows: list[tuple[str, float, float]] = []  # (kind, wall start, wall end)
            cpu = {"calm": 0.0, "busy": 0.0}
            for _ in range(ROUNDS):
                for kind, length in (("calm", CALM_S), ("busy", BUSY_S)):
                    if kind == "busy":
                        scalper.send_signal(signal.SIGCONT)
                    cpu_before, t0 = _cpu_s(front.pid), time.time()
                    await asyncio.sleep(length)
                    cpu[kind] += _cpu_s(front.pid) - cpu_before
                    windows.append((kind, t0, time.time()))
                    if kind == "busy":
                        scalper.send_signal(signal.SIGSTOP)
            scalper.send_signal(signal.SIGTERM)
            scalper.send_signal(signal.SIGCONT)
            out, err = await asyncio.wait_for(scalper.communicate(), 30)
            await load
        assert scalper.returncode == 0, err.decode()[-2000:]
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        counts: dict[str, int] = result["counts"]
        async with open_backends(s) as direct:
            drain_s = await wait_drained(direct, sid, timeout_s=60)
            a = await audit(direct, sid)
            scalper_held = await direct.pg.fetchval(
                "SELECT coalesce(sum(quantity), 0) FROM orders WHERE sale_id = $1 "
                "AND user_id = $2", sid, "scalper",
            )
    finally:
        if scalper is not None and scalper.returncode is None:
            scalper.kill()
            await scalper.wait()
        services.stop_all()
        redis.kill9()

    def in_window(kind: str, started: float, skip: float, until: float = 1e9) -> bool:
        return any(k == kind and t0 + skip <= started < min(t1, t0 + until)
                   for k, t0, t1 in windows)

    attempts = calm.all_attempts()
    # calm: once the scalper's held answers went out; busy: once its first wave landed
    calm_lat = [x.latency_s for x in attempts if in_window("calm", x.started, TARPIT_TAIL_S)]
    busy_lat = [x.latency_s for x in attempts if in_window("busy", x.started, ARRIVAL_S)]
    arrival_lat = [
        x.latency_s for x in attempts if in_window("busy", x.started, 0.0, ARRIVAL_S)
    ]
    calm_p99, busy_p99 = percentile(calm_lat, 99), percentile(busy_lat, 99)
    scalper_requests = sum(counts.values())
    busy_total_s = ROUNDS * BUSY_S
    figures.update(
        scalper_concurrency=SCALPER_CONCURRENCY, scalper_requests=scalper_requests,
        scalper_rps=round(scalper_requests / busy_total_s), scalper_answers=counts,
        scalper_accepted=counts.get("202", 0), per_user_limit=PER_USER_LIMIT,
        scalper_units_held=int(scalper_held),
        scalper_429_without_retry_after=result["retry_after_missing"],
        rate_limit={"per_s": RATE_USER_PER_S, "burst": RATE_USER_BURST, "tarpit_s": 1.0},
        windows=f"{ROUNDS} x ({CALM_S} s calm, {BUSY_S} s scalper)",
        calm_requests=len(calm_lat), calm_p50_ms=ms(percentile(calm_lat, 50)),
        calm_p99_ms=ms(calm_p99), busy_requests=len(busy_lat),
        busy_p50_ms=ms(percentile(busy_lat, 50)), busy_p99_ms=ms(busy_p99),
        arrival_wave_p99_ms=ms(percentile(arrival_lat, 99)),
        arrival_wave_max_ms=ms(max(arrival_lat, default=0.0)),
        p99_ratio=round(busy_p99 / calm_p99, 2) if calm_p99 else None,
        front_cpu_calm_pct=round(100 * cpu["calm"] / (ROUNDS * CALM_S), 1),
        front_cpu_busy_pct=round(100 * cpu["busy"] / busy_total_s, 1),
        calm_statuses=calm.statuses(), drain_s=round(drain_s, 2), ledger=a.ledger,
    )
    print(
        f"\nscalper: {scalper_requests} requests over {SCALPER_CONCURRENCY} connections "
        f"({scalper_requests / busy_total_s:.0f}/s), answers {counts}; calm buyers p99 "
        f"{ms(calm_p99)} ms alone, {ms(busy_p99)} ms beside the scalper "
        f"(x{busy_p99 / calm_p99 if calm_p99 else 0:.2f}; its first wave: max "
        f"{ms(max(arrival_lat, default=0.0))} ms); front CPU "
        f"{figures['front_cpu_calm_pct']}% calm, {figures['front_cpu_busy_pct']}% beside it"
    )

    assert counts.get("202", 0) <= PER_USER_LIMIT and int(scalper_held) <= PER_USER_LIMIT
    assert set(counts) <= {"202", "409:limit_exceeded", "429:rate_limited"}, counts
    assert counts.get("429:rate_limited", 0) >= scalper_requests * 0.9, counts
    assert scalper_requests >= SCALPER_CONCURRENCY * ROUNDS, "the scalper did not hammer"
    assert result["retry_after_missing"] == 0
    assert calm.statuses() == {"202": len(attempts)}, calm.statuses()
    assert len(calm_lat) >= 400 and len(busy_lat) >= 500, (len(calm_lat), len(busy_lat))
    # the mechanism that keeps the calm buyers' latency: every 429 is held (the
    # tarpit), so each scalper connection loops at most 1 / TARPIT_MIN_S a second
    # (without it: ~2,000 refusals/s and the calm p99 x31). The p99s themselves
    # are figures: on 2 shared cores they follow whatever else the machine runs
    # (a CI run beside other work read 10.6 -> 193 ms with the scalper held).
    assert scalper_requests / busy_total_s <= SCALPER_MAX_RPS, (
        f"the scalper looped at {scalper_requests / busy_total_s:.0f}/s: its 429s were not held"
    )
    assert a.drained
    assert a.ledger["consistent"] is True, a.ledger
