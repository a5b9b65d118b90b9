"""The reservation path: every check and every write in one Lua call.

Reservations for the same sale that arrive in the same event-loop tick are
coalesced into one ``reserve_batch`` call (one round trip for many buyers);
a lone request is a batch of one. Each item is still decided exactly as if
it ran alone (see lua/reserve_batch-8.lua), and packed alone: an item that
cannot be encoded fails by itself, never its batch.

A lost reply (timeout or broken link after the call was sent) is resolved
before anyone is answered, so that a 503 keeps the contract's promise that
nothing was reserved: the order ids are made before the call, so
``resolve_orders`` tells, in one atomic step, which were reserved (202) and
voids the others (never reserved afterwards: a late copy of the request is
refused). When Redis cannot be asked, a keyless order is released through the
release protocol for unpersisted orders; a keyed one is 503 "outcome
unknown, retry with the same key". The happy path pays nothing for this.

With FLASHSALE_REDIS_REPLICA_ACKS the script goes out with one WAIT and a
batch too few replicas acknowledged is released through that same release
(replication.py), keyed orders too (their records are then forgotten).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flashsale import errors
from flashsale.core import record, release
from flashsale.core.backends import Backends, RedisUnverified, as_text
from flashsale.core.keys import SaleKeys
from flashsale.core.record import Order
from flashsale.core.record import new_order_id as new_order_id
from flashsale.core.replication import NOT_REPLICATED, Replication, forget_accepted
from flashsale.core.scripts import (
    ACCEPTED,
    REPLAY,
    RESERVE_ERRORS,
    VOIDED,
    ReserveCode,
)
from flashsale.core.statuses import HOLDING

log = logging.getLogger("flashsale.core.reserve")

OUTCOME_UNKNOWN = (
    "the connection to Redis broke during the reservation; the outcome is unknown: retry "
    "with the same Idempotency-Key to get it"
)
NOT_RESERVED = "Redis did not answer the reservation in time; nothing was reserved: retry"
RELEASED = (
    "Redis did not answer the reservation in time and its outcome is unknown, so it was "
    "cancelled: nothing stays reserved (stock it may have taken is being returned); retry"
)
UNKNOWN_KEYLESS = (
    "Redis and PostgreSQL did not answer during the reservation; its outcome is unknown and, "
    "without an Idempotency-Key, cannot be looked up: an order made then holds its stock "
    "until it expires. Send an Idempotency-Key to make a retry return the first outcome"
)
NOT_VERIFIED = (
    "Redis is being checked against PostgreSQL (it restarted or failed over); nothing was "
    "reserved: retry shortly"
)
RELEASE_ACTOR = "reserver"
RELEASE_DETAIL = "reservation reply lost; released before the 503"
UNREPLICATED_DETAIL = "not acknowledged by enough Redis replicas in time; released before the 503"
RESOLVE_PAUSE_S = 0.05  # between lookups of a lost reply (each bounded by redis_timeout_s)
VOID_KEEP_MS = 86_400_000  # a voided order id is refused this long (lua/resolve_orders-3.lua)
CLAIM_MARGIN_S = 300  # a cluster key claim outlives the sale's record it guards by this
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # the packing's separators and the records'


@dataclass(frozen=True, slots=True)
class Accepted:
    """A reservation's acceptance: the order it made, and whether this answer
    is a replay (from the idempotency key's record)."""

    order: Order
    replay: bool

    @property
    def order_id(self) -> str:
        return self.order.order_id

    @property
    def sale_id(self) -> str:
        return self.order.sale_id

    def body(self) -> dict[str, Any]:
        return self.order.body()


@dataclass(slots=True)
class _Item:
    user_id: str
    quantity: int
    idempotency_key: str | None
    future: asyncio.Future[Outcome]
    ticket: str = field(default="")  # the waiting-room pass's ticket (verified by the front)
    order_id: str = field(default="")
    fingerprint: bytes = field(default=b"")
    record_key: bytes | None = field(default=None)  # the idempotency record's key, if keyed
    packed: bytes = field(default=b"")  # its one reserve_batch argument


def fingerprint(sale_id: str, quantity: int) -> str:
    return f"{sale_id}|{quantity}"


def _accepted(sale_id: str, item: _Item, detail: str, replay: bool) -> Accepted:
    """The item's order from its acceptance (see flashsale/core/record.py),
    made when its order id says (the batch's now_ms, or the first request's)."""
    created_ms = record.created_ms_of(detail.partition("\t")[0])
    return Accepted(record.from_acceptance(
        sale_id, item.user_id, item.idempotency_key, created_ms, detail
    ), replay)


@dataclass(frozen=True, slots=True)
class Refused:
    """A decided refusal (sold out, limit, not active, key reused, no sale).

    A value, not an exception: refusals are most answers in a flash sale, and
    raising one per request costs a traceback and frame cycles for the GC.
    """

    error: type[errors.FlashsaleError]
    replay: bool


Outcome = Accepted | Refused
_REFUSED = {code: Refused(cls, replay=False) for code, cls in RESERVE_ERRORS.items()}
_REFUSED_REPLAY = {code: Refused(cls, replay=True) for code, cls in RESERVE_ERRORS.items()}
_KEY_REUSED = _REFUSED[ReserveCode.KEY_REUSED]


def _outcome(sale_id: str, item: _Item, code: int, detail: str) -> Outcome:
    """Map one script result (see lua/reserve_batch-8.lua) to its outcome."""
    if code == ACCEPTED:
        return _accepted(sale_id, item, detail, replay=False)
    if code == REPLAY:
        _fp, stored_code, stored_detail = detail.split("\n", 2)
        if int(stored_code) == ACCEPTED:
            return _accepted(sale_id, item, stored_detail, replay=True)
        return _REFUSED_REPLAY[int(stored_code)]
    return _REFUSED[code]


def _pack(k: SaleKeys, items: list[_Item], now_ms: int) -> list[_Item]:
    """Give each item its order id and its encoded script argument, item by
    item: one that cannot be packed (a user id or key that is not valid UTF-8
    or holds a separator; authentication refuses them first) fails alone.
    Returns the items packed."""
    packed = []
    for item in items:
        item.order_id = new_order_id(k.sale_id, now_ms)
        try:
            user = item.user_id.encode()
        except UnicodeEncodeError:
            user = b""
        if not user or _CONTROL.search(item.user_id):
            item.future.set_exception(errors.Unauthorized(
                "the token's sub must be valid Unicode without control characters"
            ))
            continue
        key = item.idempotency_key
        if key is not None and (not key.isascii() or _CONTROL.search(key)):
            item.future.set_exception(errors.InvalidRequest(
                "Idempotency-Key must be 1-128 printable ASCII characters"
            ))
            continue
        fp = fingerprint(k.sale_id, item.quantity).encode()
        item.fingerprint = fp
        if key is None:
            flag, text = b"0", b""
        else:
            item.record_key = k.idempotency(item.user_id, key).encode()
            flag, text = b"1", key.encode()
        item.packed = b"\x1f".join(
            (item.order_id.encode(), user, b"%d" % item.quantity, flag, fp, text,
             item.ticket.encode())
        )
        packed.append(item)
    return packed


@dataclass(slots=True)
class _Lane:
    """One sale's reservations waiting for a script call, and calls in flight."""

    waiting: list[_Item] = field(default_factory=list)
    inflight: int = 0
    scheduled: bool = False


class Reserver:
    """Coalesces reservations per sale into script calls.

    Requests that arrive in one loop tick go out together; while a sale has
    ``inflight_batches`` calls in flight, newcomers wait and leave in the next
    (larger) batch — batches grow with load. A sale's waiting line is bounded
    (``queue_max``): past it the answer is 503 ``overloaded`` at once, nothing
    reserved, so a stalled Redis sheds load instead of queueing without end.
    """

    def __init__(self, backends: Backends) -> None:
        s = backends.settings
        self._b = backends
        self._lanes: dict[str, _Lane] = {}
        self._batch_max = s.reserve_batch_max
        self._inflight_max = s.reserve_inflight_batches
        self._queue_max = s.reserve_queue_max
        self._tasks: set[asyncio.Task[None]] = set()
        # acknowledged means replicated (FLASHSALE_REDIS_REPLICA_ACKS): see replication.py
        self._replication = (
            Replication(backends, RELEASE_ACTOR) if s.redis_replica_acks > 0 else None
        )

    async def reserve(
        self, sale_id: str, user_id: str, quantity: int, idempotency_key: str | None,
        ticket: str = "",
    ) -> Outcome:
        lane = self._lanes.get(sale_id)
        if lane is None:
            lane = self._lanes[sale_id] = _Lane()
        if len(lane.waiting) >= self._queue_max:
            raise errors.Overloaded()
        loop = asyncio.get_running_loop()
        item = _Item(user_id, quantity, idempotency_key, loop.create_future(), ticket)
        lane.waiting.append(item)
        self._schedule(sale_id, lane)
        try:
            return await item.future
        finally:  # a refusal raised here: no frame -> item -> future -> exc -> frame cycle
            del item

    def _schedule(self, sale_id: str, lane: _Lane) -> None:
        if not lane.scheduled and lane.waiting and lane.inflight < self._inflight_max:
            lane.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, sale_id)

    def _flush(self, sale_id: str) -> None:
        lane = self._lanes.get(sale_id)
        if lane is None:
            return
        lane.scheduled = False
        while lane.waiting and lane.inflight < self._inflight_max:
            batch = lane.waiting[: self._batch_max]
            del lane.waiting[: self._batch_max]
            lane.inflight += 1
            task = asyncio.create_task(self._run(sale_id, lane, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, sale_id: str, lane: _Lane, items: list[_Item]) -> None:
        lost: tuple[list[_Item], int, bool] | None = None
        try:
            lost = await self._decide(sale_id, items)
        finally:
            lane.inflight -= 1
            if lane.waiting:
                self._schedule(sale_id, lane)
            elif lane.inflight == 0 and self._lanes.get(sale_id) is lane:
                del self._lanes[sale_id]
        if lost is not None:  # resolved outside the lane's slot: the next batch goes on
            lost_items, now_ms, unreplicated = lost
            try:
                if unreplicated:  # reserved but not replicated in time (replication.py)
                    await self._release_unknown(sale_id, lost_items, now_ms, unreplicated=True)
                else:
                    await self._resolve(sale_id, lost_items, now_ms)
            finally:  # cancelled half way: nobody is left without an answer
                self._fail_all(lost[0], errors.Unavailable(OUTCOME_UNKNOWN))

    async def _decide(
        self, sale_id: str, items: list[_Item]
    ) -> tuple[list[_Item], int, bool] | None:
        """One script call for the items. Returns the items, the batch's now_ms
        and False when the reply was lost (the caller resolves them); the new
        orders, now_ms and True when too few replicas acknowledged the batch
        (the caller releases them); else None."""
        now_ms = int(time.time() * 1000)
        k = self._b.keys(sale_id)
        items = _pack(k, items, now_ms)
        if items and self._b.settings.redis_cluster:
            items = await self._claim(k, items)
        if not items:
            return None
        keys: list[Any] = [
            k.sale, k.users, k.holds, k.pending, k.stream, k.void, k.room_used, k.room_admitted
        ]
        args: list[Any] = [now_ms, self._b.settings.idempotency_ttl_s, len(items)]
        for item in items:
            keys.append(item.record_key or k.sale)
            args.append(item.packed)
        acked = 0
        try:
            if self._replication is None:
                results = await self._b.scripts.reserve_batch(keys=keys, args=args)
            else:  # the script and one WAIT for the batch (replication.py)
                results, acked = await self._replication.reserve_batch(keys, args)
        except RedisUnverified:  # refused at connect, before the script was sent
            self._fail_all(items, errors.Unavailable(NOT_VERIFIED))
            return None
        except (RedisTimeoutError, RedisConnectionError, OSError):
            # sent, maybe run, the reply lost: find out before answering anyone
            return items, now_ms, False
        except RedisError as exc:  # refused by Redis (BUSY, OOM, ...): the script wrote nothing
            self._fail_all(items, errors.Unavailable(f"reservation failed: {exc}"))
            return None
        except BaseException:
            self._fail_all(items, errors.Unavailable(OUTCOME_UNKNOWN))
            raise
        decided: list[Outcome | errors.FlashsaleError] = []
        for i, item in enumerate(items):
            code, detail = int(results[2 * i]), as_text(results[2 * i + 1])
            # only a late copy of a lost request meets a void
            decided.append(errors.Unavailable(NOT_RESERVED) if code == VOIDED
                           else _outcome(sale_id, item, code, detail))
        to_release: list[int] = []
        if self._replication is not None:  # answered only once replicated (replication.py)
            answers, to_release = await self._replication.settle(sale_id, items, decided, acked)
            decided = [answers.get(i, o) for i, o in enumerate(decided)]
        releasing = set(to_release)
        for i, item in enumerate(items):
            o = decided[i]
            if item.future.done() or i in releasing:
                continue
            if isinstance(o, errors.FlashsaleError):
                item.future.set_exception(o)
            else:
                item.future.set_result(o)
        if to_release:
            return [items[i] for i in to_release], now_ms, True
        return None

    async def _claim(self, k: SaleKeys, items: list[_Item]) -> list[_Item]:
        """Redis Cluster: each keyed item claims its key for this sale and body
        (``SET NX``, the buyer's own record, outside the sale's slot) before the
        script runs, since the sale's idempotency record lives in the sale's slot
        and cannot see other sales. A claim naming another sale or body is 422,
        whichever request came first; the claim outlives the record it guards.
        Returns the items still to decide."""
        keyed = [item for item in items if item.idempotency_key is not None]
        if not keyed:
            return items
        ttl = self._b.settings.idempotency_ttl_s + CLAIM_MARGIN_S
        try:
            async with self._b.redis.pipeline(transaction=False) as pipe:
                for item in keyed:
                    assert item.idempotency_key is not None
                    pipe.set(
                        k.idempotency_claim(item.user_id, item.idempotency_key),
                        item.fingerprint, nx=True, ex=ttl, get=True,
                    )
                claimed: list[Any] = await pipe.execute()
        except (RedisError, OSError):  # no script ran: nothing reserved
            self._fail_all(keyed, errors.Unavailable("Redis did not answer; nothing was reserved"))
        else:
            for item, prev in zip(keyed, claimed, strict=True):
                if prev is not None and prev != item.fingerprint:
                    item.future.set_result(_KEY_REUSED)
        return [item for item in items if not item.future.done()]

    async def _resolve(self, sale_id: str, items: list[_Item], now_ms: int) -> None:
        """The call failed after it was sent. Ask Redis (resolve_orders, fresh
        connections, for up to ``reserve_resolve_s``) which order ids were
        reserved: those are 202; the others are voided (never reserved later)
        and 503 "nothing reserved". If Redis cannot be asked: a keyed item is 503
        "outcome unknown, retry with the same key" (its record answers the
        retry; releasing it would make that replay name a released order); a
        keyless one is released (_release_unknown)."""
        window = self._b.settings.reserve_resolve_s
        found = await self._lookup(sale_id, [i.order_id for i in items], now_ms, window)
        if found is not None:
            reserved = sum(1 for code, _detail in found.values() if code == ACCEPTED)
            log.warning(
                "lost reply of a reservation batch of sale %s resolved: %d reserved (202), "
                "%d voided (503)", sale_id, reserved, len(items) - reserved,
                extra={"resolved_reserved": reserved, "resolved_voided": len(items) - reserved},
            )
            for item in items:
                code, detail = found[item.order_id]
                if code == ACCEPTED:
                    item.future.set_result(_accepted(sale_id, item, detail, replay=False))
                else:
                    item.future.set_exception(errors.Unavailable(NOT_RESERVED))
            return
        keyed = [item for item in items if item.idempotency_key is not None]
        keyless = [item for item in items if item.idempotency_key is None]
        log.warning(
            "lost reply of a reservation batch of sale %s unresolved: %d keyed answered "
            "'outcome unknown', %d keyless to release", sale_id, len(keyed), len(keyless),
            extra={"unresolved_keyed": len(keyed), "unresolved_keyless": len(keyless)},
        )
        self._fail_all(keyed, errors.Unavailable(OUTCOME_UNKNOWN))
        if keyless:
            await self._release_unknown(sale_id, keyless, now_ms)

    async def _lookup(
        self, sale_id: str, order_ids: list[str], now_ms: int, window_s: float
    ) -> dict[str, tuple[int, str]] | None:
        """resolve_orders for the order ids, tried on fresh connections for up to
        ``window_s`` (each try bounded by ``redis_timeout_s``): order id -> (code,
        detail). None when Redis did not answer (or has lost the sale) in time."""
        s = self._b.settings
        k = self._b.keys(sale_id)
        keys: list[Any] = [k.sale, k.holds, k.void]
        args: list[Any] = [now_ms, VOID_KEEP_MS, *order_ids]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + window_s
        while (remaining := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(min(s.redis_timeout_s, remaining)):
                    raw = await self._fresh_eval(self._b.scripts.resolve_orders, keys, args)
            except (RedisError, OSError, TimeoutError) as exc:
                log.info("lookup of a lost reservation reply failed: %r", exc)
                await asyncio.sleep(min(RESOLVE_PAUSE_S, max(0.0, deadline - loop.time())))
                continue
            codes = [int(raw[2 * i]) for i in range(len(order_ids))]
            if ReserveCode.SALE_NOT_FOUND in codes:  # Redis lost the sale
                return None
            return {
                oid: (code, as_text(raw[2 * i + 1]))
                for i, (oid, code) in enumerate(zip(order_ids, codes, strict=True))
            }
        return None

    async def _fresh_eval(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """One script call on a new connection of its own (never a pooled one,
        which may be the broken link), sent once: no client retry."""
        r = self._b.redis
        conn: Connection
        if isinstance(r, RedisCluster):
            node = r.get_node_from_key(keys[0])
            if node is None:
                raise RedisConnectionError("no node serves the sale's slot")
            conn = node.connection_class(**node.connection_kwargs)
        else:
            conn = r.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        conn.retry = Retry(NoBackoff(), 0)
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
            try:
                await conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                return await conn.read_response()
            except NoScriptError:
                await conn.send_command("EVAL", script.script, len(keys), *keys, *args)
                return await conn.read_response()
        finally:
            await conn.disconnect(nowait=True)

    async def _release_unknown(
        self, sale_id: str, items: list[_Item], now_ms: int, *, unreplicated: bool = False
    ) -> None:
        """Keyless items whose outcome Redis could not tell are released with the
        release protocol for orders not yet persisted (core/release.py): the order row goes
        in already ``failed``, with its release row, ``ON CONFLICT DO NOTHING``
        -- the consumer's later insert of the stream entry then does nothing --
        and its hold, if the script ran, goes back through release.lua (now, or
        from the outbox). Whoever commits the order row first wins: if the
        consumer did (persisted, holding), the answer is that order's 202.
        If PostgreSQL does not answer either, the outcome stays unknown and,
        without a key, the buyer cannot learn it: an order made then is a normal
        order, held until it expires (the 503's message says so).

        Keyed items come here only from a batch too few replicas acknowledged
        (replication.py: Redis answered, the orders are held). Released, their
        "accepted" records are forgotten, so a retry decides afresh; if
        PostgreSQL does not answer they are 503 "outcome unknown, retry with
        the same key" (their records answer the retry)."""
        b = self._b
        ids = [item.order_id for item in items]
        try:
            async with asyncio.timeout(b.settings.pg_timeout_s):
                sale = await b.pg.fetchrow(
                    "SELECT price_cents, hold_seconds FROM sales WHERE sale_id = $1", sale_id
                )
                if sale is None:
                    raise LookupError(f"sale {sale_id} is not in PostgreSQL")
                inserted = await release.record_unpersisted(b.pg, [
                    Order(
                        item.order_id, sale_id, item.user_id, item.quantity,
                        sale["price_cents"] * item.quantity, now_ms,
                        now_ms + sale["hold_seconds"] * 1000, item.idempotency_key,
                    )
                    for item in items
                ], "failed", RELEASE_ACTOR, UNREPLICATED_DETAIL if unreplicated else RELEASE_DETAIL)
                rows = {r["order_id"]: r for r in await b.pg.fetch(
                    "SELECT order_id, quantity, amount_cents, status, expires_at FROM orders "
                    "WHERE order_id = ANY($1::text[])", [i for i in ids if i not in inserted],
                )} if len(inserted) < len(ids) else {}
        except (asyncpg.PostgresError, OSError, TimeoutError, LookupError) as exc:
            log.warning("release of %d orders of unknown outcome failed: %r", len(ids), exc)
            self._fail_all([i for i in items if i.idempotency_key is None],
                           errors.Unavailable(UNKNOWN_KEYLESS))
            self._fail_all(items, errors.Unavailable(OUTCOME_UNKNOWN))
            return
        keyed = [(item.user_id, item.idempotency_key, item.order_id) for item in items
                 if item.idempotency_key is not None and item.order_id in inserted]
        if keyed:  # replication.py: a retry then decides afresh
            try:
                await forget_accepted(b, sale_id, keyed)
            except (RedisError, OSError) as exc:  # a retry may replay the released order
                log.warning("forgetting %d released orders' keys failed: %r", len(keyed), exc)
        if inserted:
            await self._return_released(
                sale_id, [i for i in ids if i in inserted], now_ms, voids=not unreplicated
            )
        for item in items:
            row = rows.get(item.order_id)
            if row is not None and row["status"] in HOLDING:  # persisted first: a real order
                item.future.set_result(Accepted(Order(
                    item.order_id, sale_id, item.user_id, row["quantity"], row["amount_cents"],
                    now_ms, int(row["expires_at"].timestamp() * 1000), item.idempotency_key,
                ), replay=False))
            else:
                item.future.set_exception(errors.Unavailable(
                    NOT_REPLICATED if unreplicated else
                    RELEASED if item.order_id in inserted else NOT_RESERVED
                ))

    async def _return_released(
        self, sale_id: str, order_ids: list[str], now_ms: int, *, voids: bool = True
    ) -> None:
        """Step 2 of that release, best effort within about ``redis_timeout_s``:
        void what the script has not reserved (a late copy of the request then
        reserves nothing; not ``voids`` when the script's reply came: it ran),
        then release.lua (guarded by the hold) returns what it did and closes
        the outbox rows. What fails here the compensator's outbox sweep
        finishes with release.lua."""
        s = self._b.settings
        if voids and await self._lookup(sale_id, order_ids, now_ms, s.redis_timeout_s) is None:
            log.warning("release of %d orders left to the outbox", len(order_ids))
            return
        try:
            async with asyncio.timeout(s.redis_timeout_s + s.pg_timeout_s):
                await release.in_redis(self._b, [(oid, sale_id) for oid in order_ids])
        except (RedisError, OSError, asyncpg.PostgresError, TimeoutError) as exc:
            log.warning("release of %d orders left to the outbox: %r", len(order_ids), exc)

    @staticmethod
    def _fail_all(items: list[_Item], exc: errors.FlashsaleError) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(exc)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
