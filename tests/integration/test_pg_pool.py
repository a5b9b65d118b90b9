"""The PostgreSQL pool's release: one round trip less per use, nothing leaks.

asyncpg's default reset on release sends ``pg_advisory_unlock_all(); CLOSE
ALL; UNLISTEN *; RESET ALL`` on every release; flashsale's pool
(core/backends.pg_pool) keeps only asyncpg's own step, which rolls back a
transaction left open. Through a real PostgreSQL: what a release sends, and
that a transaction never outlives its user.
"""

from __future__ import annotations

from dataclasses import replace

from flashsale.config import Settings
from flashsale.core.backends import pg_pool


async def test_release_sends_no_reset_round_trip(settings: Settings) -> None:
    pool = await pg_pool(replace(settings, pg_pool_min=1, pg_pool_max=1))
    try:
        async with pool.acquire() as conn:
            # a session setting survives the release: no RESET ALL ran (with
            # asyncpg's default reset it reads back the server's default)
            await conn.execute("SET application_name = 'flashsale-pool-probe'")
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid  # the same session
            assert await conn.fetchval("SHOW application_name") == "flashsale-pool-probe"
    finally:
        await pool.close()


async def test_a_transaction_left_open_is_rolled_back_on_release(settings: Settings) -> None:
    pool = await pg_pool(replace(settings, pg_pool_min=1, pg_pool_max=1))
    try:
        async with pool.acquire() as conn:
            await conn.execute("CREATE TEMP TABLE IF NOT EXISTS probe (n int)")
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO probe VALUES (1)")
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM probe") == 0
    finally:
        await pool.close()
