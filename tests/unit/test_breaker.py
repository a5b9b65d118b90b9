"""The circuit breaker's states, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from flashsale.commerce.breaker import CircuitBreaker, CircuitOpen, State


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Service:
    def __init__(self) -> None:
        self.calls = 0
        self.failing = True
        self.delay_s = 0.0

    async def __call__(self) -> str:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.failing:
            raise ConnectionError("down")
        return "ok"


def _state(breaker: CircuitBreaker) -> State:
    return breaker.state  # read afresh (mypy would narrow the property across calls)


def _breaker(clock: Clock, timeout_s: float = 1.0) -> CircuitBreaker:
    return CircuitBreaker("svc", failure_threshold=3, open_s=10.0, call_timeout_s=timeout_s,
                          clock=clock)


async def _fail(breaker: CircuitBreaker, svc: Service, times: int) -> None:
    for _ in range(times):
        with pytest.raises(ConnectionError):
            await breaker.call(svc)


async def test_opens_after_consecutive_failures_and_then_fails_fast() -> None:
    clock, svc = Clock(), Service()
    breaker = _breaker(clock)
    await _fail(breaker, svc, 2)
    assert _state(breaker) is State.CLOSED
    await _fail(breaker, svc, 1)
    assert _state(breaker) is State.OPEN and breaker.opened_count == 1
    for _ in range(5):
        with pytest.raises(CircuitOpen) as info:
            await breaker.call(svc)
        assert 0 < info.value.retry_after_s <= 10.0
    assert svc.calls == 3  # the open breaker never called the service


async def test_a_success_resets_the_failure_count() -> None:
    clock, svc = Clock(), Service()
    breaker = _breaker(clock)
    await _fail(breaker, svc, 2)
    svc.failing = False
    assert await breaker.call(svc) == "ok"
    svc.failing = True
    await _fail(breaker, svc, 2)
    assert _state(breaker) is State.CLOSED


async def test_half_open_trial_closes_on_success_reopens_on_failure() -> None:
    clock, svc = Clock(), Service()
    breaker = _breaker(clock)
    await _fail(breaker, svc, 3)
    clock.now += 10.0
    assert _state(breaker) is State.HALF_OPEN
    await _fail(breaker, svc, 1)  # the trial fails: open again, for a full window
    assert _state(breaker) is State.OPEN and breaker.opened_count == 2
    clock.now += 9.9
    assert _state(breaker) is State.OPEN
    clock.now += 0.1
    svc.failing = False
    assert await breaker.call(svc) == "ok"
    assert _state(breaker) is State.CLOSED


async def test_half_open_lets_one_trial_through_at_a_time() -> None:
    clock, svc = Clock(), Service()
    breaker = _breaker(clock)
    await _fail(breaker, svc, 3)
    clock.now += 10.0
    svc.failing, svc.delay_s = False, 0.05
    trial = asyncio.create_task(breaker.call(svc))
    await asyncio.sleep(0)
    with pytest.raises(CircuitOpen):
        await breaker.call(svc)
    assert await trial == "ok"
    assert _state(breaker) is State.CLOSED and svc.calls == 4


async def test_a_slow_call_times_out_and_counts_as_a_failure() -> None:
    clock, svc = Clock(), Service()
    breaker = _breaker(clock, timeout_s=0.01)
    svc.failing, svc.delay_s = False, 1.0
    for _ in range(3):
        with pytest.raises(TimeoutError):
            await breaker.call(svc)
    assert _state(breaker) is State.OPEN


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", failure_threshold=0, open_s=1, call_timeout_s=1)
