"""Real Redis and PostgreSQL for every integration test.

The servers are the ones named by FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL
when set, otherwise embedded ones started for the run. PostgreSQL isolation:
a fresh database per run (migrated once); Redis isolation: a key prefix per
test (tests/support.test_settings).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from flashsale import migrate
from flashsale.config import Settings
from tests.support import Api, running_app, test_settings


@pytest.fixture(scope="session")
def server_urls() -> Iterator[tuple[str, str]]:
    redis_url = os.environ.get("FLASHSALE_REDIS_URL")
    database_url = os.environ.get("FLASHSALE_DATABASE_URL")
    if redis_url and database_url:
        yield redis_url, database_url
        return
    from flashsale.embedded import EmbeddedServers

    data_dir = Path(tempfile.mkdtemp(prefix="flashsale-test-"))
    data_dir.chmod(0o755)
    servers = EmbeddedServers(data_dir, redis=not redis_url, postgres=not database_url)
    servers.start()
    try:
        yield redis_url or servers.redis_url or "", database_url or servers.database_url or ""
    finally:
        servers.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
async def database_url(server_urls: tuple[str, str]) -> AsyncIterator[str]:
    """A fresh, migrated database for this test run, dropped afterwards."""
    admin_dsn = server_urls[1]
    name = "flashsale_test_" + secrets.token_hex(4)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = _with_database(admin_dsn, name)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate.migrate(conn)
    finally:
        await conn.close()
    yield dsn
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


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
