"""Load generators: wrk (the real one), a tiny aiohttp client (``--quick`` fallback),
and the open-loop generator (bench/openloop/openloop.c, constant arrival rate).

Both send the same request — ``POST /api/v1/sales/{sale}/orders`` with a
random buyer's JWT from the pre-minted pool, a unique Idempotency-Key and
``{"quantity":1}`` — over a fixed number of keep-alive connections for a
fixed time, and return the same :class:`LoadResult`. The load generator's own
CPU is measured too: it shares the machine with the servers.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk" / "reserve.lua"
MARKER = "BENCH_JSON "


class _Figures:
    """What both generators' results answer: the generator's cores, a status count."""

    duration_s: float
    status: dict[str, int]
    loadgen_cpu_s: float

    @property
    def loadgen_cores(self) -> float:
        return self.loadgen_cpu_s / self.duration_s if self.duration_s else 0.0

    def count(self, status: int) -> int:
        return self.status.get(str(status), 0)


@dataclass
class LoadResult(_Figures):
    tool: str
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    status: dict[str, int]
    socket_errors: int
    loadgen_cpu_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["loadgen_cores"] = round(self.loadgen_cores, 3)
        return d


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


async def run_wrk(
    url: str, tokens_file: Path, *, connections: int, threads: int, duration_s: float,
    nonce: str, timeout_s: float = 5.0,
) -> LoadResult:
    """One wrk run; its CPU is the rusage of the reaped child."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (bash bench/ensure-wrk.sh)")
    argv = [
        wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
        f"--timeout={timeout_s:g}s", "--latency", "-s", str(WRK_SCRIPT), url,
        "--", str(tokens_file), nonce, str(threads),
    ]
    before = _children_cpu_s()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    cpu = _children_cpu_s() - before
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith(MARKER)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}\n{err.decode()}")
    data = json.loads(line[len(MARKER) :])
    duration = data["duration_us"] / 1e6
    lat = data["latency_us"]
    errs = data["errors"]
    return LoadResult(
        tool="wrk",
        requests=data["requests"],
        duration_s=duration,
        rps=data["requests"] / duration if duration else 0.0,
        p50_ms=lat["p50"] / 1000, p90_ms=lat["p90"] / 1000, p99_ms=lat["p99"] / 1000,
        p999_ms=lat["p999"] / 1000, max_ms=lat["max"] / 1000,
        status={str(k): int(v) for k, v in data["status"].items()},
        socket_errors=errs["connect"] + errs["read"] + errs["write"] + errs["timeout"],
        loadgen_cpu_s=cpu,
    )


def _percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[idx]


async def run_python(
    url: str, tokens: list[str], *, connections: int, duration_s: float, nonce: str,
    timeout_s: float = 5.0,
) -> LoadResult:
    """The fallback: ``connections`` client loops on one aiohttp session.

    Far slower than wrk (it is Python); only ``--quick`` uses it, when wrk is missing.
    """
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    errors = 0
    body = b'{"quantity":1}'
    cpu0 = time.process_time()
    deadline = time.monotonic() + duration_s
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def client(n: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        mine = tokens[n::connections] or tokens
        random.Random(f"{nonce}-{n}").shuffle(mine)
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            headers = {
                "Authorization": "Bearer " + mine[seq % len(mine)],
                "Idempotency-Key": f"{nonce}-{n}-{seq}",
                "Content-Type": "application/json",
            }
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
            except (aiohttp.ClientError, OSError, TimeoutError):
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(n, session) for n in range(connections)))
    duration = time.monotonic() - started
    latencies.sort()
    done = sum(statuses.values())
    return LoadResult(
        tool="python-aiohttp",
        requests=done,
        duration_s=duration,
        rps=done / duration if duration else 0.0,
        p50_ms=_percentile(latencies, 50) * 1000, p90_ms=_percentile(latencies, 90) * 1000,
        p99_ms=_percentile(latencies, 99) * 1000, p999_ms=_percentile(latencies, 99.9) * 1000,
        max_ms=(latencies[-1] * 1000) if latencies else 0.0,
        status={str(k): v for k, v in statuses.items()},
        socket_errors=errors,
        loadgen_cpu_s=time.process_time() - cpu0,
    )


# ---------------------------------------------------------------------------
# open loop: bench/openloop/openloop.c (constant arrival rate, the wrk2 method)
# ---------------------------------------------------------------------------

OPENLOOP_SRC = Path(__file__).resolve().parent / "openloop" / "openloop.c"
OPENLOOP_BIN = OPENLOOP_SRC.with_suffix("")


def build_openloop() -> Path:
    """The generator's binary, compiled from its source when missing or older
    (``make bench`` builds it first; the smoke test comes here)."""
    fresh = OPENLOOP_BIN.exists() and OPENLOOP_BIN.stat().st_mtime >= OPENLOOP_SRC.stat().st_mtime
    if not fresh:
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise RuntimeError("the open-loop generator needs a C compiler (gcc)")
        subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", str(OPENLOOP_BIN), str(OPENLOOP_SRC)],
                       check=True, capture_output=True, text=True)
    return OPENLOOP_BIN


@dataclass
class OpenLoopResult(_Figures):
    """One constant-rate run: latencies from each request's due time, in ms."""

    offered: float
    achieved: float
    duration_s: float
    sent: int
    completed: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    max_send_lag_ms: float  # the generator's own lateness (its saturation), not the server's
    status: dict[str, int]
    errors: dict[str, int]
    loadgen_cpu_s: float

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["loadgen_cores"] = round(self.loadgen_cores, 3)
        d["loadgen_cpu_us_per_request"] = (
            round(self.loadgen_cpu_s / self.sent * 1e6, 1) if self.sent else None)
        return d


async def run_openloop(
    url: str, tokens_file: Path, *, rate: float, duration_s: float, connections: int,
    nonce: str, timeout_s: float = 5.0,
) -> OpenLoopResult:
    """One open-loop run of ``rate`` requests/s for ``duration_s`` against ``url``."""
    binary = await asyncio.to_thread(build_openloop)
    parts = urlsplit(url)
    argv = [
        str(binary), "--host", parts.hostname or "127.0.0.1", "--port", str(parts.port or 80),
        "--path", parts.path, "--rate", f"{rate:.1f}", "--duration", f"{duration_s:g}",
        "--connections", str(connections), "--tokens", str(tokens_file), "--nonce", nonce,
        "--timeout-ms", f"{timeout_s * 1000:g}",
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"openloop failed ({proc.returncode}): {err.decode()[-2000:]}")
    d = json.loads(out.decode().strip().splitlines()[-1])
    return OpenLoopResult(
        offered=d["offered"], achieved=d["achieved"], duration_s=d["duration_s"],
        sent=d["sent"], completed=d["completed"], p50_ms=d["p50_ms"], p90_ms=d["p90_ms"],
        p99_ms=d["p99_ms"], p999_ms=d["p999_ms"], max_ms=d["max_ms"],
        max_send_lag_ms=d["max_send_lag_ms"],
        status={str(k): int(v) for k, v in d["status"].items()},
        errors={str(k): int(v) for k, v in d["errors"].items()}, loadgen_cpu_s=d["cpu_s"],
    )
