"""What every system of one bench run shares: options, servers, secrets, buyers, clients."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from redis.asyncio import Redis

from bench import loadgen
from bench.loadgen import LoadResult


@dataclass(frozen=True)
class Options:
    quick: bool
    runs: int
    duration_s: float
    warmup_s: float
    warmup_max_s: float
    connections: int
    threads: int
    users: int
    drain_orders: int
    workers: tuple[int, ...]
    systems: tuple[str, ...]
    loadgen: str  # "wrk" or "python"
    profile: bool
    out_dir: Path
    pg_pool: int


@dataclass
class Lab:
    opts: Options
    workdir: Path
    redis_url: str
    dsn: str
    server_pids: dict[str, list[int]]  # embedded redis / postgres (empty for given URLs)
    prefix: str
    jwt_secret: str
    admin_token: str
    webhook_secret: str
    tokens: list[str]
    tokens_file: Path
    http: aiohttp.ClientSession
    redis: Redis

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def child_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "FLASHSALE_REDIS_URL": self.redis_url,
            "FLASHSALE_DATABASE_URL": self.dsn,
            "FLASHSALE_KEY_PREFIX": self.prefix,
            "FLASHSALE_ADMIN_TOKEN": self.admin_token,
            "FLASHSALE_JWT_SECRET": self.jwt_secret,
            "FLASHSALE_WEBHOOK_SECRET": self.webhook_secret,
            "FLASHSALE_DATA_DIR": str(self.workdir / "data"),
            "FLASHSALE_HOST": "127.0.0.1",
            "FLASHSALE_LOG_LEVEL": "WARNING",
            "FLASHSALE_ACCESS_LOG": "0",  # no access log line per request in a benchmark
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra)
        return env

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    async def load(self, url: str, duration_s: float, tag: str) -> LoadResult:
        """One load-generator run against ``url`` (a sale's orders URL)."""
        nonce = f"{tag}.{secrets.token_hex(4)}"
        if self.opts.loadgen == "wrk":
            return await loadgen.run_wrk(
                url, self.tokens_file, connections=self.opts.connections,
                threads=self.opts.threads, duration_s=duration_s, nonce=nonce,
            )
        return await loadgen.run_python(
            url, self.tokens, connections=self.opts.connections, duration_s=duration_s,
            nonce=nonce,
        )
