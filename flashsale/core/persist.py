"""The stream consumer: persists accepted orders and the final deduction.

Loop: ``XREADGROUP >`` for new entries (bounded batch, bounded block), a
bounded ``XAUTOCLAIM`` for entries another consumer left idle (it died), one
PostgreSQL transaction per batch, ``XACK`` only after the commit. Orders are
inserted with ``ON CONFLICT DO NOTHING`` on ids made before the write, so a
redelivered entry is harmless. An entry that PostgreSQL refuses alone
(``_refused``: a data error or a constraint on the row) ``max_deliveries``
times is dead-lettered (its hold compensated) and never blocks the others;
before any dead letter its order is looked up in PostgreSQL (``dead_letters.tombstone``),
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
from redis.exceptions import RedisError, ResponseError

from flashsale.core import clients, dead_letters, events, live_sales, record, release
from flashsale.core.backends import Backends
from flashsale.core.deduct import persist_batch, refused, transient
from flashsale.core.record import Order
from flashsale.ops import logs
from flashsale.ops.metrics import Metrics

log = logging.getLogger("flashsale.core.persist")

SALES_REFRESH_S = 1.0
CLAIM_INTERVAL_S = 1.0
RECLAIM_CHUNK = 50  # entries claimed at a time (see Persister._reclaim)
BACKOFF_MAX_S = 2.0
ATTEMPTS_TRACKED_MAX = 100_000
TX_RETRIES = 3  # tries of one transaction PostgreSQL rolled back (deadlock, serialization)
TX_RETRY_PAUSE_S = (0.01, 0.1)  # jittered pause between those tries

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
            key = clients.as_text(stream)
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
                with logs.context(sale=self._streams.get(key)):
                    log.warning(
                        "sale %s: stream %s had lost consumer group %r (its key was deleted "
                        "or evicted, then recreated); group recreated at id 0. Entries the "
                        "lost key held, if any, are for `reconcile` to find",
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
                self._claim_cursor[key] = clients.as_text(res[0])
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
            if transient(exc):
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
        times = {clients.as_text(p["message_id"]): int(p["times_delivered"]) for p in info}
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
                await dead_letters.dead_letter(self._b, self._m,
                    self._streams[key], item[1], None, "delivered too many times", item[2]
                )
            elif not await dead_letters.checked(
                self._b, self._m, self.name, entry, "delivered too many times"
            ):
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
                if refused(exc):
                    return exc
                raise
            await self._after_commit(entries, failed)
            return None
        raise AssertionError("unreachable")  # the last attempt returns or raises

    async def handle(self, batch: list[tuple[str, str, dict[bytes, bytes]]]) -> int:
        if not batch:
            return 0
        entries: list[Order] = []
        for key, entry_id, fields in batch:
            try:
                entries.append(record.from_entry(self._streams[key], entry_id, fields))
            except record.Malformed as exc:
                await dead_letters.dead_letter(
                    self._b, self._m, self._streams[key], entry_id, None, str(exc), fields
                )
        known = await self._known_sales({e.sale_id for e in entries})
        for e in [e for e in entries if e.sale_id not in known]:
            if await dead_letters.checked(self._b, self._m, self.name, e, "sale not in PostgreSQL"):
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
                if not await dead_letters.checked(self._b, self._m, self.name, e, repr(refused)):
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
            await release.failed(self._b, failed)
            self._m.orders_failed.inc(len(failed))

    async def _known_sales(self, sale_ids: set[str]) -> set[str]:
        sql = "SELECT sale_id FROM sales WHERE sale_id = ANY($1::text[])"
        return {r["sale_id"] for r in await self._b.pg.fetch(sql, list(sale_ids))}


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
