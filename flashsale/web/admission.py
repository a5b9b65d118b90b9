"""Admission control in the front: token buckets per buyer and for the whole
process (429 with Retry-After). Cheap, in memory, bounded in size.

Per process: with N front processes a buyer's effective rate is up to N
times the bucket. That is fine for its purpose — keeping one client from
taking a process's event loop — while correctness (per-user limit, stock)
is decided in Redis.

A buyer over their limit gets the 429 late (``limited_delay_s``, a tarpit):
answering at once lets a client with many connections loop as fast as the
front can refuse it, and refusing still costs the event loop (parse, token,
response) — measured: 200 connections, ~2,000 refusals/s, the other buyers'
p99 x30. Held answers cost a timer each and slow such a client to about
connections / delay, and the delay is jittered (0.5-1.5x) so that those
connections do not come back in step (a wave of 200 at once is itself a
p99 spike for everyone else). At most ``delayed_max`` answers are held at
once; past that they go out at once.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import OrderedDict

from flashsale.errors import RateLimited


class TokenBucket:
    __slots__ = ("burst", "rate_per_s", "stamp", "tokens")

    def __init__(self, rate_per_s: float, burst: float, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate_per_s)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class BuyerRateLimited(RateLimited):
    """This buyer sends too many requests; retry later."""

    delay_s: float = 0.0  # how long the front holds the answer (the tarpit)


class Admission:
    """Per-buyer buckets (LRU-bounded) and one global bucket; 0 disables a limit."""

    def __init__(
        self, *, user_rate_per_s: float, user_burst: float, global_rate_per_s: float,
        users_max: int = 100_000, limited_delay_s: float = 0.0, delayed_max: int = 10_000,
    ) -> None:
        self._user_rate = user_rate_per_s
        self._user_burst = max(1.0, user_burst)
        self._users: OrderedDict[str, TokenBucket] = OrderedDict()
        self._users_max = users_max
        self._delay_s = limited_delay_s
        self._delayed_max = delayed_max
        self.delayed = 0  # answers held right now
        now = time.monotonic()
        self._global = (
            TokenBucket(global_rate_per_s, max(1.0, global_rate_per_s), now)
            if global_rate_per_s > 0 else None
        )

    def admit(self, user_id: str) -> None:
        now = time.monotonic()
        if self._global is not None:
            wait = self._global.take(now)
            if wait:
                raise _limited("the service is at its request rate limit", wait)
        if self._user_rate <= 0:
            return
        bucket = self._users.get(user_id)
        if bucket is None:
            if len(self._users) >= self._users_max:
                self._users.popitem(last=False)
            bucket = self._users[user_id] = TokenBucket(self._user_rate, self._user_burst, now)
        else:
            self._users.move_to_end(user_id)
        wait = bucket.take(now)
        if wait:
            # built by a helper: an ``exc`` local in this frame would make the cycle
            # exc -> traceback -> frame -> exc, garbage for the GC on every 429
            raise _buyer_limited(wait, self._delay_s)

    async def hold(self, exc: RateLimited) -> None:
        """Wait before a buyer's 429 goes out (see the module docstring)."""
        if not isinstance(exc, BuyerRateLimited) or exc.delay_s <= 0:
            return
        if self.delayed >= self._delayed_max:
            return
        self.delayed += 1
        try:  # jittered, so that a client's many connections do not come back in step
            await asyncio.sleep(exc.delay_s * random.uniform(0.5, 1.5))
        finally:
            self.delayed -= 1


def _buyer_limited(wait_s: float, delay_s: float) -> BuyerRateLimited:
    exc = BuyerRateLimited("too many requests from this buyer")
    exc.retry_after_s = max(1, math.ceil(wait_s))
    exc.delay_s = delay_s
    return exc


def _limited(message: str, wait_s: float) -> RateLimited:
    exc = RateLimited(message)
    exc.retry_after_s = max(1, math.ceil(wait_s))
    return exc
