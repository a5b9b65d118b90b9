"""The stream consumer: persists accepted orders and the final deduction.

Loop: ``XREADGROUP >`` for new entries (bounded batch, bounded block), a
bounded ``XAUTOCLAIM`` for entries another consumer left idle (it died), one
PostgreSQL transaction per batch, ``XACK`` only after the commit. Orders are
inserted with ``ON CONFLICT DO NOTHING`` on ids made before the write, so a
redelivered entry is harmless. An entry that PostgreSQL refuses alone
(``_refused``: a data error or a constraint on the row) ``max_deliveries``
times is dead-lettered (its hold compensated) and never blocks the others;
before any dead letter its order is looked up in PostgreSQL (``_tombstone``),
and one found there is acked as persisted instead. PostgreSQL busy,
restarting or unreachable (``_transient``) is never held against an entry:
the step backs off (bounded, jittered) and retries, and the delivery is taken
back from the entries' counters (``undo_delivery.lua``). A stream that lost
its consumer group gets it back at id 0 (``_repair_groups``) without holding
up the other sales' streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict
from typing import Any

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flashsale.core import events, live_sales, record, release
from flashsale.core.backends import Backends, Conn, as_text
from flashsale.core.record import Order
from flashsale.core.sales import stream_pos
from flashsale.ops.metrics import Metrics

log = logging.getLogger("flashsale.core.persist")

DLQ_MAXLEN = 100_000
SALES_REFRESH_S = 1.0
CLAIM_INTERVAL_S = 1.0
RECLAIM_CHUNK = 50  # entries claimed at a time (see Persister._reclaim)
BACKOFF_MAX_S = 2.0
ATTEMPTS_TRACKED_MAX = 100_000
TX_RETRIES = 3  # tries of one transaction PostgreSQL rolled back (deadlock, serialization)
TX_RETRY_PAUSE_S = (0.01, 0.1)  # jittered pause between those tries

_DEDUCT = """
UPDATE sales SET sold = sold + $2,
    persisted_stream_ms = GREATEST(persisted_stream_ms, $3),
    persisted_stream_seq = CASE WHEN $3 > persisted_stream_ms THEN $4
        WHEN $3 = persisted_stream_ms THEN GREATEST(persisted_stream_seq, $4)
        ELSE persisted_stream_seq END
WHERE sale_id = $1 AND sold + $2 <= stock RETURNING sold
"""  # with the stream watermark (sales.stream_pos): never lowered


async def persist_batch(conn: Conn, entries: list[Order], actor: str) -> list[Order]:
    """Persist entries in ONE transaction. Returns the orders that failed their
    final deduction (recorded as failed with a release row, to compensate)."""
    failed: list[Order] = []
    by_id = {e.order_id: e for e in entries}
    async with conn.transaction():
        inserted = await record.insert(conn, entries, "awaiting_payment")
        per_sale: dict[str, list[Order]] = defaultdict(list)
        for row in inserted:
            per_sale[row["sale_id"]].append(by_id[row["order_id"]])
        for sale_id in sorted(per_sale):  # fixed lock order
            batch = per_sale[sale_id]
            total = sum(e.quantity for e in batch)
            if await conn.fetchval(_DEDUCT, sale_id, total, *stream_pos(batch)) is not None:
                continue
            for e in batch:  # slow path: deduct order by order, fail what does not fit
                if await conn.fetchval(_DEDUCT, sale_id, e.quantity, *stream_pos([e])) is None:
                    await release.transition(
                        conn, e.order_id, "failed", actor, sold_counted=False,
                        detail="final deduction refused: sold would pass stock",
                    )
                    failed.append(e)
        failed += await _fail_duplicates(conn, entries, {r["order_id"] for r in inserted}, actor)
    return failed


async def _fail_duplicates(
    conn: Conn, entries: list[Order], inserted: set[str], actor: str
) -> list[Order]:
    """Entries neither inserted now nor present already collided on the unique
    (sale, buyer, idempotency key): Redis lost the key's record. Fail them."""
    missing = [e for e in entries if e.order_id not in inserted]
    if not missing:
        return []
    present = {
        r["order_id"]
        for r in await conn.fetch(
            "SELECT order_id FROM orders WHERE order_id = ANY($1::text[])",
            [e.order_id for e in missing],
        )
    }
    failed = [e for e in missing if e.order_id not in present]
    await release.record_unpersisted(conn, failed, "failed", actor, "duplicate idempotency key")
    return failed


class Persister:
    """One consumer of the group; run several (processes) to scale out."""

    def __init__(self, backends: Backends, metrics: Metrics, name: str | None = None) -> None:
        self._b = backends
        self._m = metrics
        self.name = name or backends.settings.consumer_name
        self._streams: dict[str, str] = {}  # stream key -> sale id
        self._sales_at = 0.0
        self._claim_at = 0.0
        self._claim_cursor: dict[str, str] = {}
        self._attempts: dict[str, int] = {}
        self._backoff_s = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        log.info("consumer %s started", self.name)
        while not stop.is_set():
            try:
                await self.step()
                self._backoff_s = 0.0
            except Exception as exc:  # the loop must outlive any failure; bounded, jittered
                self._backoff_s = min(BACKOFF_MAX_S, max(0.05, self._backoff_s * 2))
                delay = self._backoff_s * random.uniform(0.5, 1.0)
                log.warning("consumer step failed (%r); retrying in %.2fs", exc, delay)
                self._m.consumer_errors.inc()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        log.info("consumer %s stopped", self.name)

    async def step(self) -> int:
        """One bounded round: refresh sales, reclaim, read, persist. Returns entries handled."""
        loop = asyncio.get_running_loop()
        if loop.time() >= self._sales_at:
            await self._refresh_streams()
            self._sales_at = loop.time() + SALES_REFRESH_S
        if not self._streams:
            await asyncio.sleep(self._b.settings.consumer_block_ms / 1000)
            return 0
        handled = 0
        if loop.time() >= self._claim_at:
            handled += await self._reclaim()
            self._claim_at = loop.time() + CLAIM_INTERVAL_S
        handled += await self._read_new()
        return handled

    async def _refresh_streams(self) -> None:
        keys = {self._b.keys(sid).stream: sid for sid in await live_sales.ids(self._b)}
        async with self._b.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(key)
            exists = await pipe.execute()
        self._streams = {k: s for (k, s), e in zip(keys.items(), exists, strict=True) if e}

    async def _read_new(self) -> int:
        s = self._b.settings
        resp: Any
        try:
            if s.redis_cluster:
                resp = await self._read_each()
            else:
                resp = await self._b.redis.xreadgroup(
                    s.consumer_group, self.name, dict.fromkeys(self._streams, ">"),
                    count=s.consumer_batch_max, block=s.consumer_block_ms,
                )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # one stream lost its group and the read of every stream failed:
            # give the group back where it is missing, read them all next step
            await self._repair_groups(list(self._streams))
            self._sales_at = 0.0  # and list the streams again (Redis may have restarted)
            return 0
        batch: list[tuple[str, str, dict[bytes, bytes]]] = []
        for stream, items in resp or []:
            key = as_text(stream)
            for entry_id, fields in items:
                batch.append((key, entry_id.decode(), fields))
        return await self._deliver(batch)

    async def _read_each(self) -> list[Any]:
        """Redis Cluster: streams live in different slots, so one XREADGROUP per
        stream (non-blocking), then a bounded sleep when all were empty."""
        s = self._b.settings
        resp: list[Any] = []
        budget = s.consumer_batch_max
        for key in list(self._streams):
            try:
                got: Any = await self._b.redis.xreadgroup(
                    s.consumer_group, self.name, {key: ">"}, count=budget
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._repair_groups([key])
                continue
            for stream, items in got or []:
                resp.append((stream, items))
                budget -= len(items)
            if budget <= 0:
                break
        if not resp:
            await asyncio.sleep(s.consumer_block_ms / 1000)
        return resp

    async def _repair_groups(self, keys: list[str]) -> None:
        """Give the consumer group back, at id 0 (every entry still in the
        stream is read), to each stream of ``keys`` that lost it: its key was
        deleted or evicted and an ``XADD`` recreated the stream without any
        group. Only BUSYGROUP (the group is there) is ignored; a stream that is
        gone altogether is left out until a refresh finds it again."""
        group = self._b.settings.consumer_group
        async with self._b.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.xgroup_create(key, group, id="0")
            results = await pipe.execute(raise_on_error=False)
        for key, res in zip(keys, results, strict=True):
            if not isinstance(res, Exception):
                log.warning(
                    "sale %s: stream %s had lost consumer group %r (its key was deleted or "
                    "evicted, then recreated); group recreated at id 0. Entries the lost key "
                    "held, if any, are for `reconcile` to find",
                    self._streams.get(key, "?"), key, group,
                )
                self._m.consumer_group_recreated.inc()
            elif "BUSYGROUP" in str(res):
                continue
            elif "requires the key to exist" in str(res):
                self._streams.pop(key, None)
            else:
                raise res

    async def _reclaim(self) -> int:
        """Claim entries idle past the bound (their consumer died), a chunk at a
        time: a crash counts a delivery against every entry its consumer held,
        so small chunks keep that count honest and let work progress even when
        consumers keep dying."""
        s = self._b.settings
        chunk = min(s.consumer_batch_max, RECLAIM_CHUNK)
        handled = 0
        for key in list(self._streams):
            claimed = 0
            while claimed < s.consumer_batch_max:
                cursor = self._claim_cursor.get(key, "0-0")
                try:
                    res: Any = await self._b.redis.xautoclaim(
                        key, s.consumer_group, self.name, s.consumer_claim_idle_ms,
                        start_id=cursor, count=chunk,
                    )
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    await self._repair_groups([key])  # nothing to claim from a new group
                    break
                self._claim_cursor[key] = as_text(res[0])
                claimed += len(res[1])
                items = [(key, eid.decode(), f) for eid, f in res[1] if f]
                if items:
                    self._m.consumer_reclaimed.inc(len(items))
                    handled += await self._deliver(items, reclaimed_from=key)
                if self._claim_cursor[key] == "0-0" or not res[1]:
                    break
        return handled

    async def _deliver(
        self, batch: list[tuple[str, str, dict[bytes, bytes]]], reclaimed_from: str | None = None
    ) -> int:
        """Handle one delivery of entries: read, or reclaimed from a stream.
        When it fails for a reason that is not the entries' own (``_transient``:
        PostgreSQL busy, restarting, unreachable), the delivery is taken back
        from their counters before the failure goes up: the step backs off,
        the entries stay pending and are reclaimed later, and only crashes and
        PostgreSQL's refusals count toward dead-lettering."""
        try:
            items = batch
            if reclaimed_from is not None:
                items = await self._dead_letter_exhausted(reclaimed_from, batch)
            return await self.handle(items)
        except Exception as exc:
            if _transient(exc):
                await self._undo_delivery(batch)
            raise

    async def _undo_delivery(self, batch: list[tuple[str, str, dict[bytes, bytes]]]) -> None:
        per_stream: dict[str, list[str]] = defaultdict(list)
        for key, entry_id, _fields in batch:
            per_stream[key].append(entry_id)
        for key, ids in per_stream.items():
            try:
                await self._b.scripts.undo_delivery(
                    keys=[key], args=[self._b.settings.consumer_group, *ids]
                )
            except RedisError as exc:  # Redis failing too: these counts stay one higher
                log.warning("delivery of %d entries of %s not taken back (%r)", len(ids), key, exc)

    async def _dead_letter_exhausted(
        self, key: str, items: list[tuple[str, str, dict[bytes, bytes]]]
    ) -> list[tuple[str, str, dict[bytes, bytes]]]:
        """Reclaimed entries delivered more than max_deliveries times (consumers
        kept dying while they held them, or PostgreSQL kept refusing them; a
        busy PostgreSQL does not count, see _deliver) are tried once more,
        together, then each alone: a consumer's crash counts against every
        entry it held, so most of them are innocent. One that PostgreSQL
        refuses alone, or past twice the bound, goes to the dead-letter stream
        unless PostgreSQL has its order already. The rest are returned."""
        s = self._b.settings
        info: Any = await self._b.redis.xpending_range(
            key, s.consumer_group, min=items[0][1], max=items[-1][1], count=len(items),
        )
        times = {as_text(p["message_id"]): int(p["times_delivered"]) for p in info}
        bound = s.consumer_max_deliveries
        keep = []
        retry: list[tuple[tuple[str, str, dict[bytes, bytes]], Order]] = []
        dead: list[tuple[tuple[str, str, dict[bytes, bytes]], Order | None]] = []
        for item in items:
            delivered = times.get(item[1], 0)
            if delivered <= bound:
                keep.append(item)
                continue
            entry: Order | None
            try:
                entry = record.from_entry(self._streams[key], item[1], item[2])
            except record.Malformed:
                entry = None
            if entry is not None and delivered <= 2 * bound:
                retry.append((item, entry))
            else:
                dead.append((item, entry))
        done = await self._persist_exhausted([e for _item, e in retry])
        dead += [(item, e) for item, e in retry if e.entry_id not in done]
        for item, entry in dead:
            if entry is None:
                await self._dead_letter(
                    self._streams[key], item[1], None, "delivered too many times", item[2]
                )
            elif not await self._dead_letter_checked(entry, "delivered too many times"):
                keep.append(item)  # committed before its consumer died: ack it as persisted
        return keep

    async def _persist_exhausted(self, entries: list[Order]) -> set[str]:
        """Ids of the entries persisted and acked: all in one transaction when
        PostgreSQL takes them, else each alone."""
        if not entries:
            return set()
        if await self._persist_now(entries) is None:
            return {e.entry_id for e in entries}
        return {e.entry_id for e in entries if await self._persist_now([e]) is None}

    async def _persist_now(self, entries: list[Order]) -> asyncpg.PostgresError | None:
        """Persist entries in one transaction and ack them. Returns PostgreSQL's
        refusal of a row (``_refused``), None when committed. A transaction
        PostgreSQL rolled back (deadlock, serialization failure) is tried again
        a bounded number of times after a jittered pause; any other failure
        (PostgreSQL busy, restarting or unreachable) is raised at once: no
        entry is blamed for it (see _deliver)."""
        for attempt in range(1, TX_RETRIES + 1):
            try:
                async with self._b.pg.acquire() as conn:
                    failed = await persist_batch(conn, entries, self.name)
            except asyncpg.TransactionRollbackError:
                if attempt == TX_RETRIES:
                    raise
                await asyncio.sleep(random.uniform(*TX_RETRY_PAUSE_S))
                continue
            except asyncpg.PostgresError as exc:
                if _refused(exc):
                    return exc
                raise
            await self._after_commit(entries, failed)
            return None
        raise AssertionError("unreachable")  # the last attempt returns or raises

    async def _tombstone(self, e: Order) -> bool:
        """Before an entry is dead-lettered, record its order as failed (with
        its release row) so that no consumer can persist it afterwards. False
        when the order is in PostgreSQL otherwise: a consumer committed it (and
        died, or is slow, before the ack), so it must be acked as persisted, not
        released. PostgreSQL refusing the row itself means no consumer can
        write the order either: True. Any other failure is raised."""
        try:
            if not await release.record_unpersisted(
                self._b.pg, [e], "failed", self.name, "dead-lettered: delivered too many times"
            ):  # failed already (an earlier attempt died): go on
                status = await self._b.pg.fetchval(
                    "SELECT status FROM orders WHERE order_id = $1", e.order_id
                )
                return bool(status == "failed")
        except asyncpg.PostgresError as exc:
            if not _refused(exc):
                raise
            # PostgreSQL refuses the row as the entry has it: no consumer can
            # write it, unless the order is there already (then one did)
            status = await self._b.pg.fetchval(
                "SELECT status FROM orders WHERE order_id = $1", e.order_id
            )
            return status is None or status == "failed"
        return True

    async def _dead_letter_checked(self, e: Order, reason: str) -> bool:
        """The one way a parsed entry is dead-lettered: only once PostgreSQL
        has recorded its order as failed (``_tombstone``). False, with nothing
        done, when PostgreSQL has the order: the caller acks it as persisted."""
        if not await self._tombstone(e):
            return False
        await self._dead_letter(e.sale_id, e.entry_id, e, reason, {})
        return True

    async def handle(self, batch: list[tuple[str, str, dict[bytes, bytes]]]) -> int:
        if not batch:
            return 0
        entries: list[Order] = []
        for key, entry_id, fields in batch:
            try:
                entries.append(record.from_entry(self._streams[key], entry_id, fields))
            except record.Malformed as exc:
                await self._dead_letter(self._streams[key], entry_id, None, str(exc), fields)
        known = await self._known_sales({e.sale_id for e in entries})
        for e in [e for e in entries if e.sale_id not in known]:
            if await self._dead_letter_checked(e, "sale not in PostgreSQL"):
                entries.remove(e)
        if not entries:
            return len(batch)
        refused = await self._persist_now(entries)
        if refused is not None:
            log.warning("batch of %d failed (%r); persisting one by one", len(entries), refused)
            return await self._one_by_one(entries) + len(batch) - len(entries)
        return len(batch)

    async def _one_by_one(self, entries: list[Order]) -> int:
        """Each entry alone: one PostgreSQL refuses ``consumer_max_deliveries``
        times is dead-lettered (unless PostgreSQL has its order: then it is
        acked as persisted). A failure that is not a refusal raises."""
        for e in entries:
            refused = await self._persist_now([e])
            if refused is None:
                continue
            attempts = self._attempts.get(e.entry_id, 0) + 1
            if attempts >= self._b.settings.consumer_max_deliveries:
                self._attempts.pop(e.entry_id, None)
                if not await self._dead_letter_checked(e, repr(refused)):
                    await self._after_commit([e], [])  # another consumer committed it
            else:
                if len(self._attempts) >= ATTEMPTS_TRACKED_MAX:
                    self._attempts.clear()
                self._attempts[e.entry_id] = attempts
        return len(entries)

    async def _after_commit(self, entries: list[Order], failed: list[Order]) -> None:
        """Ack what is committed, then return the stock of orders that failed."""
        per_sale: dict[str, list[Order]] = defaultdict(list)
        for e in entries:
            per_sale[e.sale_id].append(e)
        for sale_id, items in per_sale.items():
            k = self._b.keys(sale_id)
            args: list[Any] = [self._b.settings.consumer_group]
            for e in items:
                args += [e.entry_id, e.order_id, e.quantity]
            await self._b.scripts.ack_persisted(keys=[k.sale, k.pending, k.stream], args=args)
        self._m.orders_persisted.inc(len(entries) - len(failed))
        await events.publish_accepted(self._b, entries, failed)  # best effort, never raises
        if failed:
            await release.in_redis(self._b, [(e.order_id, e.sale_id) for e in failed])
            self._m.orders_failed.inc(len(failed))

    async def _known_sales(self, sale_ids: set[str]) -> set[str]:
        rows = await self._b.pg.fetch(
            "SELECT sale_id FROM sales WHERE sale_id = ANY($1::text[])", list(sale_ids)
        )
        return {r["sale_id"] for r in rows}

    async def _dead_letter(
        self, sale_id: str, entry_id: str, entry: Order | None, reason: str,
        fields: dict[bytes, bytes],
    ) -> None:
        k = self._b.keys(sale_id)
        raw = repr(fields) if fields else (repr(entry) if entry else "")
        order_id = entry.order_id if entry else fields.get(b"o", b"").decode(errors="replace")
        moved, released = await self._b.scripts.dead_letter(
            keys=[k.sale, k.users, k.holds, k.pending, k.stream, k.dlq],
            args=[
                self._b.settings.consumer_group, entry_id, order_id,
                entry.quantity if entry else record.quantity_of(fields), reason[:500],
                raw[:2000], DLQ_MAXLEN,
            ],
        )
        if int(moved):
            log.error("dead-lettered %s (%s); released %s", entry_id, reason, released)
            self._m.dead_lettered.inc()


async def run_consumers(backends: Backends, metrics: Metrics, stop: asyncio.Event) -> None:
    """``consumer_concurrency`` consumers of the group in this process, named
    ``<consumer_name>-<i>``: while one waits for its PostgreSQL commit, the
    others read, parse and ack, so the drain is not one round trip at a time.
    Each is a full consumer (its own reads, reclaims and pending entries), so
    the guarantees are those of as many processes."""
    s = backends.settings
    names = consumer_names(s.consumer_name, s.consumer_concurrency)
    await asyncio.gather(*(Persister(backends, metrics, name).run(stop) for name in names))


def consumer_names(name: str, concurrency: int) -> list[str]:
    """The group's consumer names of one process: its name alone, or ``<name>-<i>``."""
    return [name] if concurrency == 1 else [f"{name}-{i}" for i in range(concurrency)]


def _refused(exc: asyncpg.PostgresError) -> bool:
    """PostgreSQL refused the row itself: a data error (class 22, including
    asyncpg's own refusal to encode a value) or a constraint on the row (class
    23: CHECK, NOT NULL, foreign key). Only this counts against an entry."""
    return isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError)


def _transient(exc: BaseException) -> bool:
    """PostgreSQL (or Redis, or the network) failed, not the entry: every
    server error that is not a refusal of the row (too many connections,
    statement or lock timeout, admin shutdown, cannot connect now, deadlock,
    serialization failure, connection exceptions, ...) and every lost or
    timed-out connection. Retried with backoff, never counted."""
    if isinstance(exc, asyncpg.PostgresError):
        return not _refused(exc)
    return isinstance(
        exc,
        asyncpg.InterfaceError | asyncpg.InternalClientError | OSError | TimeoutError
        | RedisConnectionError | RedisTimeoutError,
    )


