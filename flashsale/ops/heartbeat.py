"""Liveness of the consumer and compensator processes, seen from anywhere.

Each worker process beats into one sorted set, ``<p>:heartbeats`` (member
``<role>:<name>``, score the time in ms), every HEARTBEAT_INTERVAL_S while
its loops run: a loop task that ended, or an event loop that is blocked,
stops the beat. A member is alive when it beat within ALIVE_WITHIN_S; a clean
stop removes it at once; members silent for FORGET_AFTER_S are dropped by
the next beat, so the set holds what ran lately, not history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from flashsale.core.clients import as_text

if TYPE_CHECKING:
    from flashsale.core.backends import Backends

log = logging.getLogger("flashsale.ops.heartbeat")

HEARTBEAT_INTERVAL_S = 2.0
ALIVE_WITHIN_S = 10.0
FORGET_AFTER_S = 3600.0
WORKERS_MAX = 1000  # members read back at most
ROLES = ("consumer", "compensator")


def heartbeat_key(prefix: str) -> str:
    return f"{prefix}:heartbeats"


class Heartbeat:
    def __init__(self, backends: Backends, role: str, name: str) -> None:
        self._b = backends
        self.member = f"{role}:{name}"
        self._key = heartbeat_key(backends.settings.key_prefix)

    async def beat(self) -> None:
        now_ms = int(time.time() * 1000)
        async with self._b.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self._key, {self.member: now_ms})
            pipe.zremrangebyscore(self._key, 0, now_ms - int(FORGET_AFTER_S * 1000))
            await pipe.execute()

    async def run(self, stop: asyncio.Event, watched: Sequence[asyncio.Future[Any]] = ()) -> None:
        """Beat until ``stop`` or until one of the ``watched`` loop tasks ends."""
        while not stop.is_set():
            if any(t.done() for t in watched):
                log.error("a %s loop ended; heartbeat %s stops", self.member, self.member)
                return
            try:
                await self.beat()
            except (RedisError, OSError) as exc:
                log.warning("heartbeat %s failed: %r", self.member, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_INTERVAL_S)
        with contextlib.suppress(RedisError, OSError):
            await self._b.redis.zrem(self._key, self.member)


async def workers(b: Backends) -> list[dict[str, Any]]:
    """Every worker that beat lately: role, name, seconds since its beat, alive."""
    now_ms = int(time.time() * 1000)
    raw: Any = await b.redis.zrevrange(
        heartbeat_key(b.settings.key_prefix), 0, WORKERS_MAX - 1, withscores=True
    )
    out = []
    for member, score in raw:
        role, _, name = as_text(member).partition(":")
        age_s = max(0.0, (now_ms - float(score)) / 1000)
        out.append(
            {"role": role, "name": name, "age_s": round(age_s, 1),
             "alive": age_s <= ALIVE_WITHIN_S}
        )
    return out


def alive_by_role(ws: list[dict[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(ROLES, 0)
    for w in ws:
        if w["alive"]:
            counts[w["role"]] = counts.get(w["role"], 0) + 1
    return counts


def start(
    b: Backends, consumer: bool, compensator: bool, loops: Sequence[asyncio.Future[Any]],
    stop: asyncio.Event,
) -> list[asyncio.Task[None]]:
    """The heartbeats of the worker roles this process runs, watching its loop tasks."""
    name = b.settings.consumer_name
    roles = [r for r, on in (("consumer", consumer), ("compensator", compensator)) if on]
    watched = list(loops)  # a copy: the caller adds these tasks to its own list
    return [asyncio.ensure_future(Heartbeat(b, r, name).run(stop, watched)) for r in roles]
