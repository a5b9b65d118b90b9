"""Which failures count against a stream entry (deduct.refused) and which
are PostgreSQL or the network failing (deduct.transient: retried, never
counted toward dead-lettering)."""

from __future__ import annotations

import asyncpg
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from flashsale.core.deduct import refused as _refused
from flashsale.core.deduct import transient as _transient

BUSY = [
    asyncpg.TooManyConnectionsError, asyncpg.QueryCanceledError, asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError, asyncpg.DeadlockDetectedError, asyncpg.SerializationError,
    asyncpg.LockNotAvailableError, asyncpg.ConnectionDoesNotExistError,
    asyncpg.PostgresConnectionError, asyncpg.CrashShutdownError, asyncpg.DiskFullError,
    asyncpg.UndefinedColumnError,  # a deploy without its migration: not the row's fault
]
REFUSED = [
    asyncpg.CheckViolationError, asyncpg.NotNullViolationError,
    asyncpg.ForeignKeyViolationError, asyncpg.DataError, asyncpg.NumericValueOutOfRangeError,
    asyncpg.StringDataRightTruncationError,
]


@pytest.mark.parametrize("cls", BUSY, ids=lambda c: c.__name__)
def test_postgres_busy_is_transient_not_refused(cls: type[asyncpg.PostgresError]) -> None:
    exc = cls("busy")
    assert _transient(exc) and not _refused(exc)


@pytest.mark.parametrize("cls", REFUSED, ids=lambda c: c.__name__)
def test_row_refusals_count_against_the_entry(cls: type[asyncpg.PostgresError]) -> None:
    exc = cls("refused")
    assert _refused(exc) and not _transient(exc)


@pytest.mark.parametrize(
    "exc",
    [ConnectionResetError(), TimeoutError(), asyncpg.InterfaceError("connection is closed"),
     RedisConnectionError("down")],
    ids=lambda e: type(e).__name__,
)
def test_lost_connections_are_transient(exc: Exception) -> None:
    assert _transient(exc)


def test_a_bug_is_neither() -> None:
    """Anything else counts like a crash (so an entry that breaks the code
    every time still ends dead-lettered, past twice the bound)."""
    assert not _transient(KeyError("x")) and not _transient(ResponseError("WRONGTYPE"))
