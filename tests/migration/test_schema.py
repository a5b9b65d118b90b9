"""The migrations, applied to an empty PostgreSQL database, build exactly the
schema below; the database itself enforces the invariants.

The expected schema is kept per migration, then per table, so a new
migration adds one entry to SCHEMA (its new tables, and what it adds to
existing ones) and nothing else changes. A migration file without an entry
fails the test on purpose: schema changes are deliberate.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from flashsale.core import migrate
from tests.support import fresh_database as support_fresh_database

TZ = "timestamp with time zone"


@dataclass(frozen=True)
class Table:
    """A table as one migration leaves it: (column, type, nullable) in order,
    constraint name -> kind (p primary, u unique, f foreign, c check), indexes."""

    columns: tuple[tuple[str, str, bool], ...] = ()
    constraints: dict[str, str] = field(default_factory=dict)
    indexes: frozenset[str] = frozenset()


NOT_NULL, NULL = False, True

# version -> table -> what that migration creates (or adds to an existing table)
SCHEMA: dict[int, dict[str, Table]] = {
    1: {
        "sales": Table(
            columns=(
                ("sale_id", "text", NOT_NULL),
                ("sku", "text", NOT_NULL),
                ("name", "text", NOT_NULL),
                ("price_cents", "bigint", NOT_NULL),
                ("stock", "bigint", NOT_NULL),
                ("sold", "bigint", NOT_NULL),
                ("per_user_limit", "integer", NOT_NULL),
                ("starts_at", TZ, NOT_NULL),
                ("ends_at", TZ, NULL),
                ("hold_seconds", "integer", NOT_NULL),
                ("created_at", TZ, NOT_NULL),
            ),
            constraints={
                "sales_pkey": "p",
                "sales_sku_check": "c",
                "sales_name_check": "c",
                "sales_price_cents_check": "c",
                "sales_stock_check": "c",
                "sales_check": "c",  # sold >= 0 AND sold <= stock
                "sales_per_user_limit_check": "c",
                "sales_check1": "c",  # ends_at IS NULL OR ends_at > starts_at
                "sales_hold_seconds_check": "c",
            },
            indexes=frozenset({"sales_pkey"}),
        ),
        "orders": Table(
            columns=(
                ("order_id", "text", NOT_NULL),
                ("sale_id", "text", NOT_NULL),
                ("user_id", "text", NOT_NULL),
                ("quantity", "integer", NOT_NULL),
                ("amount_cents", "bigint", NOT_NULL),
                ("status", "text", NOT_NULL),
                ("idempotency_key", "text", NULL),
                ("created_at", TZ, NOT_NULL),
                ("expires_at", TZ, NOT_NULL),
                ("updated_at", TZ, NOT_NULL),
                ("payment_id", "text", NULL),
                ("shipment_id", "text", NULL),
                ("tracking_number", "text", NULL),
            ),
            constraints={
                "orders_pkey": "p",
                "orders_sale_id_fkey": "f",
                "orders_user_id_check": "c",
                "orders_quantity_check": "c",
                "orders_amount_cents_check": "c",
                "orders_status_check": "c",
                "orders_payment_id_key": "u",
                "orders_shipment_id_key": "u",
            },
            indexes=frozenset({
                "orders_pkey", "orders_payment_id_key", "orders_shipment_id_key",
                "orders_idempotency_uq", "orders_sale_status", "orders_hold_expiry",
            }),
        ),
        "restocks": Table(
            columns=(
                ("restock_id", "bigint", NOT_NULL),
                ("sale_id", "text", NOT_NULL),
                ("quantity", "bigint", NOT_NULL),
                ("created_at", TZ, NOT_NULL),
                ("applied_at", TZ, NULL),
            ),
            constraints={
                "restocks_pkey": "p",
                "restocks_sale_id_fkey": "f",
                "restocks_quantity_check": "c",
            },
            indexes=frozenset({"restocks_pkey", "restocks_unapplied"}),
        ),
        "releases": Table(
            columns=(
                ("order_id", "text", NOT_NULL),
                ("sale_id", "text", NOT_NULL),
                ("quantity", "integer", NOT_NULL),
                ("reason", "text", NOT_NULL),
                ("actor", "text", NOT_NULL),
                ("detail", "text", NULL),
                ("created_at", TZ, NOT_NULL),
                ("redis_released_at", TZ, NULL),
            ),
            constraints={
                "releases_pkey": "p",
                "releases_order_id_fkey": "f",
                "releases_sale_id_fkey": "f",
                "releases_quantity_check": "c",
                "releases_reason_check": "c",
            },
            indexes=frozenset({"releases_pkey", "releases_outbox"}),
        ),
    },
    2: {
        "payments": Table(
            columns=(
                ("payment_id", "text", NOT_NULL),
                ("order_id", "text", NOT_NULL),
                ("sale_id", "text", NOT_NULL),
                ("user_id", "text", NOT_NULL),
                ("amount_cents", "bigint", NOT_NULL),
                ("status", "text", NOT_NULL),
                ("created_at", TZ, NOT_NULL),
                ("updated_at", TZ, NOT_NULL),
                ("succeeded_at", TZ, NULL),
            ),
            constraints={
                "payments_pkey": "p",
                "payments_payment_id_check": "c",
                "payments_order_id_key": "u",
                "payments_sale_id_fkey": "f",
                "payments_user_id_check": "c",
                "payments_amount_cents_check": "c",
                "payments_status_check": "c",
                "payments_check": "c",  # succeeded/refunded iff succeeded_at is set
            },
            indexes=frozenset({"payments_pkey", "payments_order_id_key"}),
        ),
        "webhook_events": Table(
            columns=(
                ("event_id", "text", NOT_NULL),
                ("type", "text", NOT_NULL),
                ("payment_id", "text", NOT_NULL),
                ("order_id", "text", NOT_NULL),
                ("outcome", "text", NOT_NULL),
                ("payload", "jsonb", NOT_NULL),
                ("received_at", TZ, NOT_NULL),
            ),
            constraints={
                "webhook_events_pkey": "p",
                "webhook_events_event_id_check": "c",
                "webhook_events_type_check": "c",
                "webhook_events_outcome_check": "c",
            },
            indexes=frozenset({"webhook_events_pkey"}),
        ),
        "refunds": Table(
            columns=(
                ("refund_id", "text", NOT_NULL),
                ("payment_id", "text", NOT_NULL),
                ("order_id", "text", NOT_NULL),
                ("amount_cents", "bigint", NOT_NULL),
                ("reason", "text", NOT_NULL),
                ("status", "text", NOT_NULL),
                ("attempts", "integer", NOT_NULL),
                ("next_attempt_at", TZ, NOT_NULL),
                ("last_error", "text", NULL),
                ("gateway_refund_id", "text", NULL),
                ("created_at", TZ, NOT_NULL),
                ("completed_at", TZ, NULL),
            ),
            constraints={
                "refunds_pkey": "p",
                "refunds_payment_id_key": "u",
                "refunds_payment_id_fkey": "f",
                "refunds_amount_cents_check": "c",
                "refunds_reason_check": "c",
                "refunds_status_check": "c",
                "refunds_attempts_check": "c",
                "refunds_check": "c",  # requested iff not completed
                "refunds_check1": "c",  # succeeded iff gateway_refund_id
            },
            indexes=frozenset({"refunds_pkey", "refunds_payment_id_key", "refunds_due"}),
        ),
        "shipments": Table(
            columns=(
                ("order_id", "text", NOT_NULL),
                ("shipment_id", "text", NULL),
                ("tracking_number", "text", NULL),
                ("status", "text", NOT_NULL),
                ("attempts", "integer", NOT_NULL),
                ("created_at", TZ, NOT_NULL),
            ),
            constraints={
                "shipments_pkey": "p",
                "shipments_order_id_fkey": "f",
                "shipments_shipment_id_key": "u",
                "shipments_status_check": "c",
                "shipments_attempts_check": "c",
                "shipments_check": "c",  # booked iff shipment_id and tracking_number
            },
            indexes=frozenset({"shipments_pkey", "shipments_shipment_id_key"}),
        ),
        "order_sagas": Table(
            columns=(
                ("order_id", "text", NOT_NULL),
                ("step", "text", NOT_NULL),
                ("attempts", "integer", NOT_NULL),
                ("next_attempt_at", TZ, NOT_NULL),
                ("last_error", "text", NULL),
                ("created_at", TZ, NOT_NULL),
                ("updated_at", TZ, NOT_NULL),
            ),
            constraints={
                "order_sagas_pkey": "p",
                "order_sagas_order_id_fkey": "f",
                "order_sagas_step_check": "c",
                "order_sagas_attempts_check": "c",
            },
            indexes=frozenset({"order_sagas_pkey", "order_sagas_due"}),
        ),
        # added to an existing table
        "orders": Table(
            constraints={
                "orders_paid_has_payment": "c",
                "orders_shipped_has_shipment": "c",
            },
        ),
    },
    3: {
        # the stream watermark: the last stream entry id persisted per sale
        "sales": Table(
            columns=(
                ("persisted_stream_ms", "bigint", NOT_NULL),
                ("persisted_stream_seq", "bigint", NOT_NULL),
            ),
            constraints={
                "sales_persisted_stream_ms_check": "c",
                "sales_persisted_stream_seq_check": "c",
            },
        ),
    },
    4: {
        "payment_inbox": Table(
            columns=(
                ("event_id", "text", NOT_NULL),
                ("type", "text", NOT_NULL),
                ("payment_id", "text", NOT_NULL),
                ("order_id", "text", NOT_NULL),
                ("amount_cents", "bigint", NOT_NULL),
                ("payload", "jsonb", NOT_NULL),
                ("received_at", TZ, NOT_NULL),
                ("attempts", "integer", NOT_NULL),
                ("next_attempt_at", TZ, NOT_NULL),
                ("last_error", "text", NULL),
                ("applied_at", TZ, NULL),
                ("outcome", "text", NULL),
            ),
            constraints={
                "payment_inbox_pkey": "p",
                "payment_inbox_payment_id_fkey": "f",
                "payment_inbox_event_id_check": "c",
                "payment_inbox_type_check": "c",
                "payment_inbox_amount_cents_check": "c",
                "payment_inbox_attempts_check": "c",
                "payment_inbox_outcome_check": "c",
                "payment_inbox_check": "c",  # applied iff an outcome
            },
            indexes=frozenset({"payment_inbox_pkey", "payment_inbox_due",
                               "payment_inbox_waiting"}),
        ),
    },
    5: {
        # the index of live sales (flashsale/core/live_sales.py)
        "sales": Table(
            columns=(("drained_at", TZ, NULL),),
            constraints={"sales_drained_after_end": "c"},
            indexes=frozenset({"sales_live"}),
        ),
    },
    6: {
        # the sale's optional waiting room (issue 12)
        "sales": Table(
            columns=(("waiting_room", "jsonb", NULL),),
            constraints={"sales_waiting_room_check": "c"},
        ),
    },
}

# the migrations runner's own ledger, present whatever the migrations are
LEDGER = {
    "schema_migrations": Table(
        columns=(
            ("version", "integer", NOT_NULL),
            ("name", "text", NOT_NULL),
            ("applied_at", TZ, NOT_NULL),
        ),
        constraints={"schema_migrations_pkey": "p"},
        indexes=frozenset({"schema_migrations_pkey"}),
    ),
}


def expected_schema(versions: list[int]) -> dict[str, Table]:
    """The union of the snapshots of ``versions``: a later migration's entry
    for an existing table appends its columns and adds its constraints/indexes."""
    merged: dict[str, Table] = dict(LEDGER)
    for v in versions:
        for name, t in SCHEMA[v].items():
            old = merged.get(name, Table())
            merged[name] = Table(
                columns=old.columns + t.columns,
                constraints={**old.constraints, **t.constraints},
                indexes=old.indexes | t.indexes,
            )
    return merged


async def actual_schema(conn: asyncpg.Connection[asyncpg.Record]) -> dict[str, Table]:
    columns: dict[str, list[tuple[str, str, bool]]] = {}
    for r in await conn.fetch(
        """
        SELECT c.table_name, c.column_name, c.data_type, c.is_nullable
        FROM information_schema.columns c
        JOIN information_schema.tables t USING (table_schema, table_name)
        WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'
        ORDER BY c.table_name, c.ordinal_position
        """
    ):
        columns.setdefault(r["table_name"], []).append(
            (r["column_name"], r["data_type"], r["is_nullable"] == "YES")
        )
    constraints: dict[str, dict[str, str]] = {}
    for r in await conn.fetch(
        """
        SELECT cl.relname AS table_name, co.conname, co.contype
        FROM pg_constraint co JOIN pg_class cl ON cl.oid = co.conrelid
        WHERE co.connamespace = 'public'::regnamespace AND co.contype <> 'n'
        """
    ):
        kind = r["contype"]
        constraints.setdefault(r["table_name"], {})[r["conname"]] = (
            kind.decode() if isinstance(kind, bytes) else str(kind)
        )
    indexes: dict[str, set[str]] = {}
    for r in await conn.fetch(
        "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'public'"
    ):
        indexes.setdefault(r["tablename"], set()).add(r["indexname"])
    return {
        name: Table(
            columns=tuple(cols),
            constraints=constraints.get(name, {}),
            indexes=frozenset(indexes.get(name, set())),
        )
        for name, cols in columns.items()
    }


# -- a fresh, empty database per test ------------------------------------------------


def fresh_database(admin_dsn: str) -> AbstractAsyncContextManager[str]:
    """An empty database, created through the admin DSN and dropped afterwards."""
    return support_fresh_database(admin_dsn, "flashsale_schema", migrated=False)


@pytest.fixture
async def empty_dsn(server_urls: tuple[str, str]) -> AsyncIterator[str]:
    async with fresh_database(server_urls[1]) as dsn:
        yield dsn


@pytest.fixture(scope="module")
async def migrated_dsn(server_urls: tuple[str, str]) -> AsyncIterator[str]:
    """One fresh database with every migration applied, for the invariant tests."""
    async with support_fresh_database(server_urls[1], "flashsale_schema") as dsn:
        yield dsn


@pytest.fixture
async def conn(migrated_dsn: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A connection to the migrated database, emptied after each test."""
    c = await asyncpg.connect(migrated_dsn)
    try:
        yield c
    finally:
        tables = await c.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename <> 'schema_migrations'"
        )
        if tables:
            names = ", ".join(f'"{r["tablename"]}"' for r in tables)
            await c.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
        await c.close()


# -- the schema ----------------------------------------------------------------------


def test_every_migration_has_a_snapshot() -> None:
    versions = [m.version for m in migrate.available()]
    assert versions, "no migrations found"
    assert versions == list(range(1, len(versions) + 1)), f"gaps or duplicates: {versions}"
    missing = [v for v in versions if v not in SCHEMA]
    assert not missing, (
        f"migration(s) {missing} have no expected snapshot in SCHEMA: add one entry per "
        "migration (its tables, and the columns/constraints/indexes it adds to others)"
    )


async def test_migrations_build_the_expected_schema(empty_dsn: str) -> None:
    c = await asyncpg.connect(empty_dsn)
    try:
        assert await migrate.is_current(c) is False
        assert await actual_schema(c) == {}
        applied = await migrate.migrate(c)
        versions = [m.version for m in migrate.available()]
        assert [m.version for m in applied] == versions
        assert await migrate.is_current(c) is True
        actual = await actual_schema(c)
    finally:
        await c.close()
    expected = expected_schema([v for v in versions if v in SCHEMA])
    assert sorted(actual) == sorted(expected), "tables differ"
    for name in sorted(expected):
        a, e = actual[name], expected[name]
        assert a.columns == e.columns, f"columns of {name}"
        assert a.constraints == e.constraints, f"constraints of {name}"
        assert a.indexes == e.indexes, f"indexes of {name}"


async def test_migrate_twice_is_a_no_op(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    before = await conn.fetch("SELECT version, name, applied_at FROM schema_migrations")
    schema = await actual_schema(conn)
    assert await migrate.migrate(conn) == []
    assert await conn.fetch("SELECT version, name, applied_at FROM schema_migrations") == before
    assert await actual_schema(conn) == schema
    assert sorted(r["version"] for r in before) == [m.version for m in migrate.available()]


async def test_concurrent_migrations_apply_each_once(empty_dsn: str) -> None:
    conns = [await asyncpg.connect(empty_dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate.migrate(c) for c in conns))
        applied = sorted(m.version for done in results for m in done)
        assert applied == [m.version for m in migrate.available()]
        assert sum(1 for done in results if done) == 1
        assert [await migrate.is_current(c) for c in conns] == [True] * len(conns)
    finally:
        for c in conns:
            await c.close()


# -- the invariants, enforced by PostgreSQL itself ---------------------------------


NOW = datetime.now(UTC)


async def _sale(conn: asyncpg.Connection[asyncpg.Record], **fields: Any) -> str:
    row: dict[str, Any] = {
        "sale_id": "sl_" + secrets.token_hex(6), "sku": "S", "name": "n", "price_cents": 100,
        "stock": 5, "per_user_limit": 2, "starts_at": NOW, "ends_at": None, "hold_seconds": 60,
    }
    row.update(fields)
    cols = ", ".join(row)
    params = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    await conn.execute(f"INSERT INTO sales ({cols}) VALUES ({params})", *row.values())
    return str(row["sale_id"])


async def _order(
    conn: asyncpg.Connection[asyncpg.Record], sale_id: str, **fields: Any
) -> str:
    row: dict[str, Any] = {
        "order_id": f"{sale_id}-{secrets.token_hex(10)}0", "sale_id": sale_id, "user_id": "u1",
        "quantity": 1, "amount_cents": 100, "status": "awaiting_payment",
        "idempotency_key": None, "created_at": NOW, "expires_at": NOW + timedelta(minutes=10),
    }
    row.update(fields)
    cols = ", ".join(row)
    params = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    await conn.execute(f"INSERT INTO orders ({cols}) VALUES ({params})", *row.values())
    return str(row["order_id"])


@pytest.mark.parametrize(
    "fields",
    [
        {"stock": -1},
        {"sold": 6, "stock": 5},
        {"sold": -1},
        {"price_cents": -1},
        {"per_user_limit": 0},
        {"hold_seconds": 0},
        {"sku": ""},
        {"sku": "s" * 65},
        {"name": ""},
        {"ends_at": NOW},
        {"ends_at": NOW - timedelta(seconds=1)},
        {"persisted_stream_ms": -1},
        {"persisted_stream_seq": -1},
    ],
    ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items())[:40],
)
async def test_sales_checks_reject_bad_rows(
    conn: asyncpg.Connection[asyncpg.Record], fields: dict[str, Any]
) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await _sale(conn, **fields)
    assert await conn.fetchval("SELECT count(*) FROM sales") == 0


async def test_sold_may_never_pass_stock(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    sid = await _sale(conn, stock=3)
    await conn.execute("UPDATE sales SET sold = 3 WHERE sale_id = $1", sid)  # exactly full
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("UPDATE sales SET sold = sold + 1 WHERE sale_id = $1", sid)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("UPDATE sales SET stock = 2 WHERE sale_id = $1", sid)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("UPDATE sales SET stock = -1, sold = 0 WHERE sale_id = $1", sid)
    row = await conn.fetchrow("SELECT stock, sold FROM sales WHERE sale_id = $1", sid)
    assert row is not None and tuple(row) == (3, 3)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"quantity": 0}, asyncpg.CheckViolationError),
        ({"amount_cents": -1}, asyncpg.CheckViolationError),
        ({"status": "pending"}, asyncpg.CheckViolationError),  # pending lives in Redis only
        ({"status": "bogus"}, asyncpg.CheckViolationError),
        ({"user_id": ""}, asyncpg.CheckViolationError),
        ({"user_id": "u" * 65}, asyncpg.CheckViolationError),
    ],
    ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items())[:30] if isinstance(v, dict)
    else v.__name__,
)
async def test_orders_checks_reject_bad_rows(
    conn: asyncpg.Connection[asyncpg.Record], fields: dict[str, Any], error: type[Exception]
) -> None:
    sid = await _sale(conn)
    with pytest.raises(error):
        await _order(conn, sid, **fields)
    assert await conn.fetchval("SELECT count(*) FROM orders") == 0


async def test_order_needs_its_sale(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await _order(conn, "sl_missing00000")


async def test_order_id_is_unique(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    sid = await _sale(conn)
    oid = await _order(conn, sid)
    with pytest.raises(asyncpg.UniqueViolationError):
        await _order(conn, sid, order_id=oid, user_id="u2")


async def test_one_order_per_sale_user_and_idempotency_key(
    conn: asyncpg.Connection[asyncpg.Record],
) -> None:
    sid = await _sale(conn)
    other_sale = await _sale(conn)
    first = await _order(conn, sid, idempotency_key="k1")
    with pytest.raises(asyncpg.UniqueViolationError):
        await _order(conn, sid, idempotency_key="k1")
    with pytest.raises(asyncpg.UniqueViolationError):
        await _order(conn, sid, idempotency_key="k1", status="cancelled")
    # the same key for another buyer, or another sale, is another key
    await _order(conn, sid, idempotency_key="k1", user_id="u2")
    await _order(conn, other_sale, idempotency_key="k1")
    # no key: any number of orders
    await _order(conn, sid)
    await _order(conn, sid)
    # a failed duplicate may stand beside the order holding the key...
    await _order(conn, sid, idempotency_key="k1", status="failed")
    await _order(conn, sid, idempotency_key="k1", status="failed")
    # ...and once the holder itself failed, the key is free for one new order
    await conn.execute("UPDATE orders SET status = 'failed' WHERE order_id = $1", first)
    await _order(conn, sid, idempotency_key="k1")
    with pytest.raises(asyncpg.UniqueViolationError):
        await _order(conn, sid, idempotency_key="k1")
    # un-failing an order whose key is taken again is refused too
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute(
            "UPDATE orders SET status = 'awaiting_payment' WHERE order_id = $1", first
        )


async def test_restocks_and_releases_checks(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    sid = await _sale(conn)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("INSERT INTO restocks (sale_id, quantity) VALUES ($1, 0)", sid)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute(
            "INSERT INTO restocks (sale_id, quantity) VALUES ('sl_missing00000', 1)"
        )
    oid = await _order(conn, sid)
    insert_release = (
        "INSERT INTO releases (order_id, sale_id, quantity, reason, actor) "
        "VALUES ($1, $2, $3, $4, 'test')"
    )
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(insert_release, oid, sid, 1, "lost")
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(insert_release, oid, sid, 0, "cancelled")
    await conn.execute(insert_release, oid, sid, 1, "cancelled")
    with pytest.raises(asyncpg.UniqueViolationError):  # one release per order, ever
        await conn.execute(insert_release, oid, sid, 1, "expired")
