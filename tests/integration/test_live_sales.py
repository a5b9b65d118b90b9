"""Work that grows with history: every loop iterates the index of live sales
(flashsale/core/live_sales.py), so one round costs what is live, whatever
the number of sales ever created.

Redis commands are counted by a dedicated redis-server child (never the
machine's shared one, whose other clients would be counted too): its
``INFO commandstats`` after ``CONFIG RESETSTAT``. SQL rows are counted by the
pool's own connection class (rows returned or changed, as PostgreSQL
reports them): both are the real servers' answers, nothing is faked.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from flashsale.config import Settings
from flashsale.core import ledger, live_sales, sales
from flashsale.core.backends import Backends, redis_client
from flashsale.core.compensate import Compensator
from flashsale.core.persist import Persister
from flashsale.core.scripts import Scripts
from flashsale.ops import live, observe
from flashsale.ops.metrics import Metrics
from tests.chaos.harness import RedisServer
from tests.support import fresh_database, test_settings

LIVE = 3  # live sales, in Redis
FEW, MANY = 10, 10_000  # ended-and-drained sales in PostgreSQL only
ROUND_COMMANDS_MAX = 30 * LIVE + 20  # per loop round, whatever the history
ROUND_ROWS_MAX = 10 * LIVE + 10

_COUNT = re.compile(r"(\d+)$")


class CountingConnection(asyncpg.Connection):
    """An asyncpg connection that counts the rows each statement returned or
    changed (the pool's connection_class: the test's own client)."""

    rows = 0

    async def fetch(self, *args: Any, **kwargs: Any) -> Any:
        got = await super().fetch(*args, **kwargs)
        CountingConnection.rows += len(got)
        return got

    async def fetchrow(self, *args: Any, **kwargs: Any) -> Any:
        got = await super().fetchrow(*args, **kwargs)
        CountingConnection.rows += got is not None
        return got

    async def fetchval(self, *args: Any, **kwargs: Any) -> Any:
        CountingConnection.rows += 1
        return await super().fetchval(*args, **kwargs)

    async def execute(self, *args: Any, **kwargs: Any) -> str:
        status: str = await super().execute(*args, **kwargs)
        found = _COUNT.search(status)
        CountingConnection.rows += int(found.group(1)) if found else 0
        return status


@dataclass(frozen=True)
class Cost:
    commands: int
    rows: int


@asynccontextmanager
async def counted_backends(tmp_path: Path, database_url: str) -> AsyncIterator[Backends]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        async with fresh_database(database_url, "flashsale_live") as dsn:
            s: Settings = test_settings(server.url, dsn)
            redis = redis_client(s)
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4,
                                             connection_class=CountingConnection)
            try:
                yield Backends(s, redis, pool, Scripts.register(redis))
            finally:
                await pool.close()
                await redis.aclose()
    finally:
        server.kill9()


async def cost(b: Backends, round_: Callable[[], Awaitable[Any]]) -> Cost:
    await b.redis.config_resetstat()
    CountingConnection.rows = 0
    await round_()
    rows = CountingConnection.rows
    stats: dict[str, Any] = await b.redis.info("commandstats")
    commands = sum(
        int(v["calls"]) for k, v in stats.items()
        if k not in ("cmdstat_info", "cmdstat_config|resetstat", "cmdstat_config")
    )
    return Cost(commands, rows)


async def insert_drained(b: Backends, first: int, n: int) -> None:
    """``n`` sales that ended and drained long ago, in one statement."""
    await b.pg.execute(
        """
        INSERT INTO sales (sale_id, sku, name, price_cents, stock, sold, per_user_limit,
                           starts_at, ends_at, hold_seconds, created_at, drained_at)
        SELECT 'sl_old' || lpad(i::text, 9, '0'), 'SKU', 'ended sale', 100, 10, 4, 2,
               now() - interval '30 days', now() - interval '29 days', 60,
               now() - interval '30 days', now() - interval '28 days'
        FROM generate_series($1::int, $1::int + $2::int - 1) AS i
        """,
        first, n,
    )


async def create_live(b: Backends) -> None:
    now = datetime.now(UTC)
    for _ in range(LIVE):
        await sales.create(b, sales.NewSale(
            sku="SKU", name="live sale", price_cents=100, stock=50, per_user_limit=2,
            starts_at=now - timedelta(minutes=1), ends_at=None, hold_seconds=600,
        ))


def rounds(b: Backends) -> dict[str, Callable[[], Awaitable[Any]]]:
    m = Metrics()
    return {
        "consumer": lambda: Persister(b, m, name="counted").step(),
        "compensator": lambda: Compensator(b, m).step(),
        "rebuild sweep": lambda: ledger.rebuild_missing(b),
        "drain": lambda: live_sales.drain(b),
        "/metrics": lambda: observe.scrape(b, m),
        "dashboard": lambda: live.snapshot(b),
    }


async def steady_costs(b: Backends) -> dict[str, Cost]:
    """Each loop's round once to warm up (scripts loaded, whatever a first
    round does once done), then each round's cost."""
    for round_ in rounds(b).values():
        await round_()
    return {name: await cost(b, r) for name, r in rounds(b).items()}


async def test_one_round_of_each_loop_costs_what_is_live_not_history(
    tmp_path: Path, database_url: str
) -> None:
    async with counted_backends(tmp_path, database_url) as b:
        await create_live(b)
        await insert_drained(b, 0, FEW)
        few = await steady_costs(b)
        await insert_drained(b, FEW, MANY - FEW)
        assert await b.pg.fetchval("SELECT count(*) FROM sales") == LIVE + MANY
        many = await steady_costs(b)
    print("\nloop round: Redis commands / SQL rows, with "
          f"{FEW} vs {MANY} ended-and-drained sales ({LIVE} live)")
    for name in few:
        print(f"  {name:14} {few[name].commands:5} / {few[name].rows:4}   "
              f"{many[name].commands:5} / {many[name].rows:4}")
    for name in few:
        assert many[name] == few[name], name
        assert few[name].commands <= ROUND_COMMANDS_MAX, name
        assert few[name].rows <= ROUND_ROWS_MAX, name


# -- draining: when a sale leaves the index, and when it comes back -------------------


async def _sale(b: Backends, *, ended: bool) -> str:
    now = datetime.now(UTC)
    body = await sales.create(b, sales.NewSale(
        sku="SKU", name="drain", price_cents=100, stock=10, per_user_limit=5,
        starts_at=now - timedelta(minutes=5), ends_at=None, hold_seconds=600,
    ))
    sale_id: str = body["sale_id"]
    if ended:
        await sales.end(b, sale_id)
    return sale_id


@pytest.fixture
async def drain_b(tmp_path: Path, database_url: str) -> AsyncIterator[Backends]:
    async with counted_backends(tmp_path, database_url) as b:
        yield replace(b, settings=replace(b.settings, live_ended_grace_s=0))


async def test_a_sale_is_live_until_it_ended_and_drained(drain_b: Backends) -> None:
    b = drain_b
    running = await _sale(b, ended=False)
    quiet = await _sale(b, ended=True)
    assert set(await live_sales.ids(b)) == {running, quiet}
    assert await live_sales.drain(b) == [quiet]
    assert await live_sales.ids(b) == [running]
    assert await live_sales.drain(b) == []
    # the grace: an ended sale stays live at least live_ended_grace_s
    graced = replace(b, settings=replace(b.settings, live_ended_grace_s=3600))
    recent = await _sale(b, ended=True)
    assert await live_sales.drain(graced) == []
    assert recent in await live_sales.ids(b)


async def test_an_ended_sale_with_work_left_is_not_drained(drain_b: Backends) -> None:
    b = drain_b
    in_stream = await _sale(b, ended=False)
    k = b.keys(in_stream)
    await b.redis.xadd(k.stream, {"o": "or_x"})  # an accepted order not persisted yet
    await b.redis.hset(k.sale, "pending", 1)
    await sales.end(b, in_stream)
    held = await _sale(b, ended=True)
    await b.pg.execute(
        "INSERT INTO orders (order_id, sale_id, user_id, quantity, amount_cents, status, "
        "created_at, expires_at) VALUES ('or_held', $1, 'u1', 1, 100, 'awaiting_payment', "
        "now(), now() + interval '10 minutes')",
        held,
    )
    unapplied = await _sale(b, ended=True)
    await b.pg.execute("INSERT INTO restocks (sale_id, quantity) VALUES ($1, 1)", unapplied)
    assert await live_sales.drain(b) == []
    assert set(await live_sales.ids(b)) == {in_stream, held, unapplied}


async def test_a_release_or_restock_brings_a_drained_sale_back(drain_b: Backends) -> None:
    b = drain_b
    sale_id = await _sale(b, ended=True)
    await b.pg.execute(
        "INSERT INTO orders (order_id, sale_id, user_id, quantity, amount_cents, status, "
        "created_at, expires_at) VALUES ('or_late', $1, 'u1', 1, 100, 'failed', "
        "now(), now() + interval '10 minutes')",
        sale_id,
    )
    assert await live_sales.drain(b) == [sale_id]
    # a release committed after the drain (a paid order the saga gave up on, say):
    # its row in the outbox brings the sale back, in the same statement
    await b.pg.execute(
        "INSERT INTO releases (order_id, sale_id, quantity, reason, actor) "
        "VALUES ('or_late', $1, 1, 'failed', 'test')",
        sale_id,
    )
    assert await live_sales.ids(b) == [sale_id]
    assert await live_sales.drain(b) == []  # its release is still to apply in Redis
    await b.pg.execute("UPDATE releases SET redis_released_at = now()")
    assert await live_sales.drain(b) == [sale_id]
    await sales.restock(b, sale_id, 1)  # applied at once: live again, drained next round
    assert await live_sales.ids(b) == [sale_id]
    assert await live_sales.drain(b) == [sale_id]
    assert await live_sales.ids(b) == []
