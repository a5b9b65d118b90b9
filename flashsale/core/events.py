"""Domain events on a Redis stream, and a notification consumer that logs them.

    <prefix>:events   stream, capped (MAXLEN ~ events_maxlen); one entry per
                      event: type, order_id, sale_id, at_ms and the event's data

Events: ``order_accepted`` (the consumer persisted it), ``order_paid`` (the
webhook committed it), ``order_shipped`` (the saga booked it),
``order_released`` (its stock went back to the sale: cancel, expiry,
failure). They are published after the PostgreSQL commit, best effort:
publishing never raises into the core flow and never delays it beyond one
Redis round trip. Delivery is at least once while Redis keeps the stream (a
redelivered stream entry can announce an order again) and may miss an event
when the process dies between the commit and the XADD: fit for
notifications, not for bookkeeping, which PostgreSQL does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from flashsale.core.clients import as_text
from flashsale.core.statuses import DomainEventType

if TYPE_CHECKING:
    from flashsale.core.backends import Backends
    from flashsale.core.record import Order

log = logging.getLogger("flashsale.core.events")
notify_log = logging.getLogger("flashsale.notify")

NOTIFY_GROUP = "notify"
NOTIFY_BATCH_MAX = 100
NOTIFY_BLOCK_MS = 200
NOTIFY_CLAIM_IDLE_MS = 30_000
NOTIFY_BACKOFF_MAX_S = 5.0


def stream_key(prefix: str) -> str:
    return f"{prefix}:events"


@dataclass(frozen=True, slots=True)
class DomainEvent:
    type: DomainEventType  # flashsale/core/statuses.py
    order_id: str
    sale_id: str
    data: Mapping[str, str | int] = field(default_factory=dict)

    def packed(self, at_ms: str) -> list[str | int]:
        data: list[str | int] = []
        for k, v in self.data.items():
            if k not in _BASE_FIELDS:
                data += [k, str(v)]
        return _packed(self.type, self.order_id, self.sale_id, at_ms, data)


_BASE_FIELDS = frozenset(("type", "order_id", "sale_id", "at_ms"))


def _packed(
    type_: str, order_id: str, sale_id: str, at_ms: str, data: list[str | int]
) -> list[str | int]:
    """One event as publish_events takes it: the number of field/value pairs,
    then type, order_id, sale_id, at_ms and the event's data pairs."""
    return [4 + len(data) // 2, "type", type_, "order_id", order_id, "sale_id", sale_id,
            "at_ms", at_ms, *data]


def _now_ms() -> str:
    return str(int(time.time() * 1000))


async def publish(b: Backends, events: Sequence[DomainEvent]) -> int:
    """Append the events in one call; log and swallow any failure."""
    at_ms = _now_ms()
    args: list[str | int] = []
    for ev in events:
        args += ev.packed(at_ms)
    return await _append(b, len(events), args)


async def _append(b: Backends, count: int, args: list[str | int]) -> int:
    """One publish_events call (lua/publish_events-1.lua) for ``count`` packed events."""
    if not count:
        return 0
    try:
        await b.scripts.publish_events(
            keys=[stream_key(b.settings.key_prefix)], args=[b.settings.events_maxlen, *args],
            client=b.redis,
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # never into the core flow
        log.warning("could not publish %d domain event(s): %r", count, exc)
        return 0
    return count


async def publish_accepted(
    b: Backends, persisted: Iterable[Order], failed: Iterable[Order]
) -> int:
    """After the consumer's commit: accepted for the persisted, released for the failed.
    Packed without a DomainEvent per order: this runs once per drained row."""
    failed_ids = {o.order_id for o in failed}
    at_ms = _now_ms()
    args: list[str | int] = []
    count = 0
    for o in persisted:
        if o.order_id in failed_ids:
            continue
        args += _packed("order_accepted", o.order_id, o.sale_id, at_ms, [
            "user_id", o.user_id, "quantity", o.quantity, "amount_cents", o.amount_cents,
        ])
        count += 1
    return await _append(b, count, args)


async def publish_released(b: Backends, released: Sequence[tuple[str, str, int]]) -> int:
    """After releases returned their stock in Redis (once per order):
    (order_id, sale_id, quantity) each, with the reason PostgreSQL recorded."""
    reasons: dict[str, str] = {}
    with contextlib.suppress(Exception):
        rows = await b.pg.fetch(
            "SELECT order_id, reason FROM releases WHERE order_id = ANY($1::text[])",
            [order_id for order_id, _s, _q in released],
        )
        reasons = {r["order_id"]: r["reason"] for r in rows}
    return await publish(b, [
        DomainEvent("order_released", order_id, sale_id,
                    {"quantity": qty, "reason": reasons.get(order_id, "unknown")})
        for order_id, sale_id, qty in released
    ])


# --------------------------------------------------------------------------- notifications


class Notifier:
    """Subscribes to the events stream (its own consumer group) and logs one line
    per event; a stand-in for e-mail or push. It reads, never writes, the
    order tables, so it cannot slow or break the order flow."""

    def __init__(self, backends: Backends, name: str = "notifier") -> None:
        self._b = backends
        self.name = name
        self._key = stream_key(backends.settings.key_prefix)
        self._group_ready = False
        self.seen = 0

    async def run(self, stop: asyncio.Event) -> None:
        backoff_s = 0.0
        while not stop.is_set():
            try:
                await self.step()
                backoff_s = 0.0
            except Exception as exc:  # outlive any failure; bounded backoff
                backoff_s = min(NOTIFY_BACKOFF_MAX_S, max(0.1, backoff_s * 2))
                log.warning("notifier step failed (%r); retrying in %.1fs", exc, backoff_s)
                self._group_ready = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff_s)

    async def step(self, block_ms: int | None = NOTIFY_BLOCK_MS) -> int:
        """Read (and reclaim) a bounded batch, log it, ack it. Returns events handled."""
        await self._ensure_group()
        redis = self._b.redis
        claimed: Any = await redis.xautoclaim(
            self._key, NOTIFY_GROUP, self.name, NOTIFY_CLAIM_IDLE_MS, start_id="0-0",
            count=NOTIFY_BATCH_MAX,
        )
        items = [(eid, f) for eid, f in claimed[1] if f]
        resp: Any = await redis.xreadgroup(
            NOTIFY_GROUP, self.name, {self._key: ">"}, count=NOTIFY_BATCH_MAX, block=block_ms,
        )
        for _stream, entries in resp or []:
            items.extend(entries)
        for _entry_id, fields in items:
            self._notify({as_text(k): as_text(v) for k, v in fields.items()})
        if items:
            await redis.xack(self._key, NOTIFY_GROUP, *[eid for eid, _ in items])
        self.seen += len(items)
        return len(items)

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._b.redis.xgroup_create(self._key, NOTIFY_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    @staticmethod
    def _notify(fields: dict[str, str]) -> None:
        kind = fields.get("type", "?")
        extra = " ".join(f"{k}={v}" for k, v in sorted(fields.items())
                         if k not in ("type", "order_id", "sale_id"))
        notify_log.info("%s order=%s sale=%s %s", kind, fields.get("order_id"),
                        fields.get("sale_id"), extra)
