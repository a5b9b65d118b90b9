"""Real Redis and PostgreSQL for every integration test.

The servers are the ones named by FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL
when set, otherwise embedded ones started for the run. PostgreSQL isolation:
a fresh database per run (migrated once); Redis isolation: a key prefix per
test (tests/support.test_settings).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from flashsale.config import Settings
from tests.support import Api, fresh_database, running_app, test_settings


@pytest.fixture(scope="session")
def server_urls() -> Iterator[tuple[str, str]]:
    redis_url = os.environ.get("FLASHSALE_REDIS_URL")
    database_url = os.environ.get("FLASHSALE_DATABASE_URL")
    if redis_url and database_url:
        yield redis_url, database_url
        return
    from flashsale.run.embedded.servers import EmbeddedServers

    data_dir = Path(tempfile.mkdtemp(prefix="flashsale-test-"))
    data_dir.chmod(0o755)
    servers = EmbeddedServers(data_dir, redis=not redis_url, postgres=not database_url)
    servers.start()
    try:
        yield redis_url or servers.redis_url or "", database_url or servers.database_url or ""
    finally:
        servers.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
async def database_url(server_urls: tuple[str, str]) -> AsyncIterator[str]:
    """A fresh, migrated database for this test run, dropped afterwards."""
    async with fresh_database(server_urls[1], "flashsale_test") as dsn:
        yield dsn


@pytest.fixture
def redis_url(server_urls: tuple[str, str]) -> str:
    return server_urls[0]


@pytest.fixture
def settings(redis_url: str, database_url: str) -> Settings:
    return test_settings(redis_url, database_url)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    """The HTTP front alone (no background loops): tests drive the consumer."""
    async with running_app(settings) as client:
        yield client
