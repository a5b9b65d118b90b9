"""Dead-lettering a stream entry: the one way an entry leaves the stream
without being persisted. A readable entry is dead-lettered only once
PostgreSQL has recorded its order as failed (``tombstone``), so no consumer
can persist it afterwards; an order PostgreSQL has already is acked as
persisted instead, never released. ``lua/dead_letter-6.lua`` moves the entry
to the sale's dead-letter stream and returns its hold, exactly once.
"""

from __future__ import annotations

import logging

import asyncpg

from flashsale.core import record, release
from flashsale.core.backends import Backends
from flashsale.core.deduct import refused
from flashsale.core.record import Order
from flashsale.core.scripts import DeadLettered
from flashsale.ops import logs
from flashsale.ops.metrics import Metrics

log = logging.getLogger(__name__)

DLQ_MAXLEN = 100_000


async def tombstone(b: Backends, actor: str, e: Order) -> bool:
    """Before an entry is dead-lettered, record its order as failed (with
    its release row) so that no consumer can persist it afterwards. False
    when the order is in PostgreSQL otherwise: a consumer committed it (and
    died, or is slow, before the ack), so it must be acked as persisted, not
    released. PostgreSQL refusing the row itself means no consumer can
    write the order either: True. Any other failure is raised."""
    try:
        if not await release.record_unpersisted(
            b.pg, [e], "failed", actor, "dead-lettered: delivered too many times"
        ):  # failed already (an earlier attempt died): go on
            status = await b.pg.fetchval(
                "SELECT status FROM orders WHERE order_id = $1", e.order_id
            )
            return bool(status == "failed")
    except asyncpg.PostgresError as exc:
        if not refused(exc):
            raise
        # PostgreSQL refuses the row as the entry has it: no consumer can
        # write it, unless the order is there already (then one did)
        status = await b.pg.fetchval(
            "SELECT status FROM orders WHERE order_id = $1", e.order_id
        )
        return status is None or status == "failed"
    return True


async def checked(b: Backends, m: Metrics, actor: str, e: Order, reason: str) -> bool:
    """The one way a parsed entry is dead-lettered: only once PostgreSQL
    has recorded its order as failed (``tombstone``). False, with nothing
    done, when PostgreSQL has the order: the caller acks it as persisted."""
    if not await tombstone(b, actor, e):
        return False
    await dead_letter(b, m, e.sale_id, e.entry_id, e, reason, {})
    return True


async def dead_letter(
    b: Backends, m: Metrics, sale_id: str, entry_id: str, entry: Order | None, reason: str,
    fields: dict[bytes, bytes],
) -> None:
    k = b.keys(sale_id)
    raw = repr(fields) if fields else (repr(entry) if entry else "")
    order_id = (entry.order_id if entry
                else fields.get(record.STREAM_ORDER_ID, b"").decode(errors="replace"))
    moved, released = DeadLettered.of(await b.scripts.dead_letter(
        keys=[k.sale, k.users, k.holds, k.pending, k.stream, k.dlq],
        args=[
            b.settings.consumer_group, entry_id, order_id,
            entry.quantity if entry else record.quantity_of(fields), reason[:500],
            raw[:2000], DLQ_MAXLEN,
        ],
    ))
    if moved:
        with logs.context(sale=sale_id, order=order_id):
            log.error("dead-lettered %s (%s); released %s", entry_id, reason, released)
        m.dead_lettered.inc()
