"""Admission control in the front: token buckets per buyer and for the whole
process (429 with Retry-After). Cheap, in memory, bounded in size.

Per process: with N front processes a buyer's effective rate is up to N
times the bucket. That is fine for its purpose — keeping one client from
taking a process's event loop — while correctness (per-user limit, stock)
is decided in Redis.
"""

from __future__ import annotations

import math
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


class Admission:
    """Per-buyer buckets (LRU-bounded) and one global bucket; 0 disables a limit."""

    def __init__(
        self, *, user_rate_per_s: float, user_burst: float, global_rate_per_s: float,
        users_max: int = 100_000,
    ) -> None:
        self._user_rate = user_rate_per_s
        self._user_burst = max(1.0, user_burst)
        self._users: OrderedDict[str, TokenBucket] = OrderedDict()
        self._users_max = users_max
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
            raise _limited("too many requests from this buyer", wait)


def _limited(message: str, wait_s: float) -> RateLimited:
    exc = RateLimited(message)
    exc.retry_after_s = max(1, math.ceil(wait_s))
    return exc
