"""front.fd_bounded: the connection cap fits under the open-file limit."""

from __future__ import annotations

import resource

import pytest

from flashsale.web import front

INF = resource.RLIM_INFINITY


class Limit:
    """RLIMIT_NOFILE as the process would see it (no real limit is changed)."""

    def __init__(self, soft: int, hard: int, *, may_raise: bool = True) -> None:
        self.soft, self.hard, self.may_raise = soft, hard, may_raise

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def set(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        if not self.may_raise:
            raise ValueError("not allowed")
        assert limits[1] == self.hard and (self.hard == INF or limits[0] <= self.hard)
        self.soft = limits[0]


@pytest.fixture
def limit(monkeypatch: pytest.MonkeyPatch) -> Limit:
    fake = Limit(1024, 1024)
    monkeypatch.setattr(resource, "getrlimit", fake.get)
    monkeypatch.setattr(resource, "setrlimit", fake.set)
    return fake


def test_the_soft_limit_is_raised_to_hold_the_cap_and_the_reserve(limit: Limit) -> None:
    limit.soft, limit.hard = 1024, 1_048_576
    assert front.fd_bounded(4096) == 4096
    assert limit.soft == 4096 + front.FD_RESERVE


def test_a_hard_limit_too_low_clamps_the_cap(limit: Limit) -> None:
    limit.soft, limit.hard = 1024, 2048
    assert front.fd_bounded(4096) == 2048 - front.FD_RESERVE
    assert limit.soft == 2048


def test_a_tiny_limit_keeps_half_for_the_process(limit: Limit) -> None:
    limit.soft, limit.hard = 256, 256
    assert front.fd_bounded(4096) == 128


def test_a_limit_that_cannot_be_raised_clamps_the_cap(limit: Limit) -> None:
    limit.soft, limit.hard, limit.may_raise = 1024, 65536, False
    assert front.fd_bounded(4096) == 1024 - front.FD_RESERVE


def test_a_cap_that_fits_is_kept_and_nothing_is_changed(limit: Limit) -> None:
    limit.soft, limit.hard = 65536, 65536
    assert front.fd_bounded(4096) == 4096
    assert limit.soft == 65536


def test_no_limit_keeps_the_cap(limit: Limit) -> None:
    limit.soft, limit.hard = INF, INF
    assert front.fd_bounded(4096) == 4096
