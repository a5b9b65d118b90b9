"""The payment inbox (migration 0004): verified gateway events that arrived
before their order was persisted (still ``pending``, only in Redis). The
webhook keeps such an event here and answers 200; the compensator's round
(``payment.apply_inbox``) applies it through the webhook's own path once the
order is in PostgreSQL, or refunds it when the order can never be. Exactly
once: the event id is unique here, and applying it records it in
``webhook_events`` in the same transaction as its effect. This module owns the
table's statements; the webhook logic is commerce/payment.py's.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg

from flashsale.core.clients import Conn

if TYPE_CHECKING:
    from flashsale.core.backends import Backends

INBOX_BACKOFF_DOUBLINGS_MAX = 30  # 2**30 x base is far past any cap: no float overflow
ERROR_MAX_CHARS = 500

_INBOX_KEEP = """
INSERT INTO payment_inbox (event_id, type, payment_id, order_id, amount_cents, payload)
VALUES ($1, $2, $3, $4, $5, $6::jsonb)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""

_INBOX_KEPT_AT = """
SELECT received_at FROM payment_inbox WHERE event_id = $1 AND applied_at IS NULL
"""

_INBOX_APPLIED = """
UPDATE payment_inbox SET applied_at = now(), outcome = $2, last_error = NULL
WHERE event_id = $1 AND applied_at IS NULL
"""

# a batch of due events, each claimed by pushing its next attempt out by its
# backoff (base x 2^attempts, capped): a crashed or a concurrent loop leaves it
# for that long, and applying twice is harmless (webhook_events decides)
_INBOX_CLAIM = """
WITH due AS (
    SELECT event_id FROM payment_inbox
    WHERE applied_at IS NULL AND next_attempt_at <= now()
    ORDER BY next_attempt_at LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE payment_inbox i SET attempts = i.attempts + 1,
    next_attempt_at = now() + make_interval(secs => least(
        $3::float8, $2::float8 * power(2, least(i.attempts, $4::int))))
FROM due WHERE i.event_id = due.event_id
RETURNING i.event_id, i.type, i.payment_id, i.order_id, i.amount_cents
"""

_INBOX_STATS = """
SELECT count(*) AS events,
       coalesce(extract(epoch FROM now() - min(received_at)), 0)::float8 AS oldest_age_s
FROM payment_inbox WHERE applied_at IS NULL
"""


async def keep(
    b: Backends, event_id: str, type_: str, payment_id: str, order_id: str,
    amount_cents: int, payload: str,
) -> bool:
    """Keep a verified event; False when it is kept already (a replay)."""
    kept = await b.pg.fetchval(
        _INBOX_KEEP, event_id, type_, payment_id, order_id, amount_cents, payload
    )
    return kept is not None


async def kept_at(conn: Conn, event_id: str) -> datetime | None:
    """When the gateway delivered a kept, unapplied event (the hold is judged at that time)."""
    value: datetime | None = await conn.fetchval(_INBOX_KEPT_AT, event_id)
    return value


async def mark_applied(conn: Conn, event_id: str, outcome: str) -> None:
    """In the transaction that applied the event: its outcome, once."""
    await conn.execute(_INBOX_APPLIED, event_id, outcome)


async def claim(b: Backends) -> list[asyncpg.Record]:
    """A bounded batch of due events, each pushed to its next attempt (backoff)."""
    s = b.settings
    return await b.pg.fetch(
        _INBOX_CLAIM, s.payment_inbox_batch_max, s.payment_inbox_backoff_base_s,
        s.payment_inbox_backoff_max_s, INBOX_BACKOFF_DOUBLINGS_MAX,
    )


async def reject(b: Backends, event_id: str, message: str) -> None:
    """An event whose payment no longer matches: applied as ``rejected``, never retried."""
    await b.pg.execute(
        "UPDATE payment_inbox SET applied_at = now(), outcome = 'rejected', "
        "last_error = $2 WHERE event_id = $1 AND applied_at IS NULL",
        event_id, message[:ERROR_MAX_CHARS],
    )


async def note_error(b: Backends, event_id: str, error: str) -> None:
    """An attempt failed (PostgreSQL or Redis): kept for its next attempt."""
    await b.pg.execute(
        "UPDATE payment_inbox SET last_error = $2 WHERE event_id = $1",
        event_id, error[:ERROR_MAX_CHARS],
    )


async def inbox_stats(b: Backends) -> tuple[int, float]:
    """Events kept and not applied yet, and the age in seconds of the oldest."""
    row = await b.pg.fetchrow(_INBOX_STATS)
    assert row is not None
    return int(row["events"]), float(row["oldest_age_s"])
