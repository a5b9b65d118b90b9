"""A small circuit breaker: closed, open, half-open.

Closed: calls go through; ``failure_threshold`` consecutive failures (an
exception or a call slower than ``call_timeout_s``) open it. Open: calls fail
at once with CircuitOpen for ``open_s``. Half-open: one trial call goes
through (others fail fast); its success closes the breaker, its failure opens
it again. Everything is bounded: no queue, at most one trial in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TypeVar

T = TypeVar("T")


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpen(Exception):
    """The breaker is open: the call was not made."""

    def __init__(self, name: str, retry_after_s: float) -> None:
        self.name = name
        self.retry_after_s = max(0.0, retry_after_s)
        super().__init__(f"circuit {name} is open; retry in {self.retry_after_s:.2f}s")


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int,
        open_s: float,
        call_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or open_s <= 0 or call_timeout_s <= 0:
            raise ValueError("failure_threshold >= 1, open_s > 0 and call_timeout_s > 0")
        self.name = name
        self._threshold = failure_threshold
        self._open_s = open_s
        self._timeout_s = call_timeout_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False
        self.opened_count = 0  # how many times it opened (metrics, tests)

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return State.CLOSED
        if self._clock() - self._opened_at < self._open_s:
            return State.OPEN
        return State.HALF_OPEN

    def retry_after_s(self) -> float:
        if self._opened_at is None:
            return 0.0
        return self._opened_at + self._open_s - self._clock()

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` under the breaker; raise CircuitOpen without calling it when open."""
        state = self.state
        if state is State.OPEN or (state is State.HALF_OPEN and self._trial_in_flight):
            raise CircuitOpen(self.name, self.retry_after_s())
        trial = state is State.HALF_OPEN
        self._trial_in_flight = self._trial_in_flight or trial
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await fn()
        except Exception:
            self._failed()
            raise
        finally:
            if trial:
                self._trial_in_flight = False
        self._succeeded()
        return result

    def _succeeded(self) -> None:
        self._failures = 0
        self._opened_at = None

    def _failed(self) -> None:
        self._failures += 1
        if self._opened_at is not None or self._failures >= self._threshold:
            if self.state is not State.OPEN:
                self.opened_count += 1
            self._opened_at = self._clock()
