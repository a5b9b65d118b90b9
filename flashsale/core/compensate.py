"""The compensator: the loop that expires unpaid holds and finishes releases.

Each round, bounded: holds past expiry in PostgreSQL (``release.expire_due``)
and in a sale's stream, not persisted yet (``expire_unpersisted``), the
payment inbox, the release outbox (``release.sweep_outbox``) and the restock
outbox. How a release happens exactly once is flashsale/core/release.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Any

from flashsale.commerce import payment
from flashsale.core import live_sales, record, release, sales
from flashsale.core.backends import Backends
from flashsale.core.clients import as_text
from flashsale.ops import logs
from flashsale.ops.metrics import Metrics

log = logging.getLogger("flashsale.core.compensate")

OUTBOX_GRACE_S = release.OUTBOX_GRACE_S  # the restock outbox waits as long as the release one


class Compensator:
    """Expires unpaid holds and finishes every release and restock in Redis."""

    def __init__(self, backends: Backends, metrics: Metrics, name: str = "compensator") -> None:
        self._b = backends
        self._m = metrics
        self.name = name
        self._unpersisted_cursor: dict[str, str] = {}  # sale id -> XRANGE start

    async def run(self, stop: asyncio.Event) -> None:
        interval = self._b.settings.compensator_interval_s
        while not stop.is_set():
            backlog = False
            try:
                _done, backlog = await self._round()
            except Exception as exc:  # the loop must outlive any failure; bounded backoff
                log.warning("compensator step failed: %r", exc)
            if backlog:  # a full batch: more is due now (mass expiry after a spike)
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def step(self) -> int:
        """One bounded round; returns the number of releases finished in Redis."""
        done, _backlog = await self._round()
        return done

    async def _round(self) -> tuple[int, bool]:
        """One bounded round: releases finished in Redis, and whether a batch
        came back full (work is left)."""
        full = self._b.settings.compensator_batch_max
        expired = await self.expire_due()
        unpersisted = await self.expire_unpersisted()
        inbox = await self.apply_payment_inbox()
        swept = await self.sweep_outbox()
        restocked = await self.sweep_restocks()
        backlog = max(expired, swept, restocked) >= full or bool(self._unpersisted_cursor)
        backlog = backlog or inbox >= self._b.settings.payment_inbox_batch_max
        return expired + unpersisted + swept, backlog

    async def expire_due(self) -> int:
        """Holds past expiry: one statement expires a batch in PostgreSQL (with
        their release rows), then one release call per sale returns the stock."""
        rows = await release.expire_due(
            self._b.pg, self._b.settings.compensator_batch_max, self.name
        )
        done = [(r.order_id, r.sale_id) for r in rows]
        await release.in_redis(self._b, done)
        _expired(done, "")
        if rows:
            self._m.releases.labels("expired").inc(len(rows))
        return len(rows)

    async def expire_unpersisted(self) -> int:
        """Holds past expiry still in a sale's stream (the consumer is down or
        behind): recorded expired in PostgreSQL, then released, a batch per
        sale at a time. Stream ids are times, so only entries older than the
        sale's hold are read, from a cursor past what earlier rounds handled
        (the entries stay in the stream until the consumer acks them)."""
        b = self._b
        now_ms = int(time.time() * 1000)
        sales_ = await live_sales.rows(b)
        if not sales_:
            return 0
        count = b.settings.compensator_batch_max
        async with b.redis.pipeline(transaction=False) as pipe:
            for r in sales_:
                cutoff = now_ms - r["hold_seconds"] * 1000
                start = self._unpersisted_cursor.get(r["sale_id"], "-")
                pipe.xrange(b.keys(r["sale_id"]).stream, start, str(max(cutoff, 0)), count=count)
            found: list[Any] = await pipe.execute()
        done: list[tuple[str, str]] = []
        for r, entries in zip(sales_, found, strict=True):
            due: list[record.Order] = []
            for entry_id, fields in entries:
                try:
                    o = record.from_entry(r["sale_id"], as_text(entry_id), fields)
                except record.Malformed:
                    continue  # unreadable entries are the consumer's to dead-letter
                if o.expires_ms <= now_ms:
                    due.append(o)
            if len(entries) == count:  # more may be due: go on after the last one read
                self._unpersisted_cursor[r["sale_id"]] = "(" + as_text(entries[-1][0])
            else:
                self._unpersisted_cursor.pop(r["sale_id"], None)
            inserted = await release.record_unpersisted(
                b.pg, due, "expired", self.name, "expired before persisted"
            )
            done += [(o.order_id, o.sale_id) for o in due if o.order_id in inserted]
        await release.in_redis(b, done)
        _expired(done, " before it was persisted")
        if done:
            self._m.releases.labels("expired").inc(len(done))
        return len(done)

    async def apply_payment_inbox(self) -> int:
        """Gateway events kept for orders that were not persisted yet: a bounded
        batch of those due, applied now that the order is in PostgreSQL (or
        refunded: it never will be), the rest backed off. See payment.py."""
        return await payment.apply_inbox(self._b)

    async def sweep_outbox(self) -> int:
        return await release.sweep_outbox(self._b, self._b.settings.compensator_batch_max)

    async def sweep_restocks(self) -> int:
        rows = await self._b.pg.fetch(
            "SELECT restock_id, sale_id, quantity FROM restocks WHERE applied_at IS NULL "
            "AND created_at <= now() - make_interval(secs => $1) ORDER BY restock_id LIMIT $2",
            OUTBOX_GRACE_S, self._b.settings.compensator_batch_max,
        )
        for row in rows:
            await sales.apply_restock(
                self._b, row["sale_id"], row["restock_id"], row["quantity"]
            )
        return len(rows)



def _expired(orders: list[tuple[str, str]], how: str) -> None:
    """One line per sale (with its id; with the order's when there is one)."""
    per_sale: Counter[str] = Counter(sale_id for _order_id, sale_id in orders)
    one = {sale_id: order_id for order_id, sale_id in orders}
    for sale_id, n in per_sale.items():
        with logs.context(sale=sale_id, order=one[sale_id] if n == 1 else None):
            log.info("sale %s: %d unpaid hold(s) expired%s, stock returned", sale_id, n, how)
