"""Fixtures of the chaos suite: a database per test, child processes, figures.

Each chaos test gets its own freshly migrated PostgreSQL database (besides
its own Redis key prefix): compensators and consumers work on every sale of
their database, so tests sharing one would compensate each other's orders
under the wrong key prefix.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from flashsale.config import Settings
from flashsale.core.backends import Backends, open_backends
from tests.chaos.harness import Services, utc_now, write_figures
from tests.support import fresh_database, test_settings

_OUTCOME = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_OUTCOME] = report.outcome
    return report


@pytest.fixture
async def chaos_database_url(server_urls: tuple[str, str]) -> AsyncIterator[str]:
    """A fresh, migrated database for this test only, dropped afterwards."""
    async with fresh_database(server_urls[1], "flashsale_chaos") as dsn:
        yield dsn


@pytest.fixture
def chaos_settings(redis_url: str, chaos_database_url: str) -> Settings:
    """Fast reclaim (300 ms idle) so that crash recovery fits in the suite's time."""
    return test_settings(redis_url, chaos_database_url, consumer_claim_idle_ms=300)


@pytest.fixture
async def direct(chaos_settings: Settings) -> AsyncIterator[Backends]:
    """The test's own connections to the servers, for setup and audits."""
    async with open_backends(chaos_settings) as b:
        yield b


@pytest.fixture
def services(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Services]:
    """Children of the test, killed at its end; their logs printed when it failed."""
    svc = Services(tmp_path)
    try:
        yield svc
    finally:
        svc.stop_all()
        if request.node.stash.get(_OUTCOME, "error") != "passed":
            print(f"\nlogs of the children of {request.node.name}:\n{svc.logs()}")


class Figures(dict[str, Any]):
    """A test's figures: printed and saved to .flashsale/chaos-figures.json."""


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    fig = Figures()
    started = time.monotonic()
    yield fig
    outcome = request.node.stash.get(_OUTCOME, "error")
    entry = {
        "outcome": outcome, "finished_at": utc_now(),
        "wall_s": round(time.monotonic() - started, 2),
        "servers": "machine" if os.environ.get("FLASHSALE_REDIS_URL") else "embedded",
        "figures": dict(fig),
    }
    print(f"\nCHAOS FIGURES {request.node.name} ({outcome}, {entry['wall_s']} s): {dict(fig)}")
    write_figures(request.node.name, entry)
