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
import time
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flashsale import errors
from flashsale.core.backends import Backends, RedisUnverified
from flashsale.core.clients import as_text
from flashsale.core.keys import SaleKeys
from flashsale.core.outcomes import (
    CLAIM_MARGIN_S,
    KEY_REUSED,
    NOT_RESERVED,
    NOT_VERIFIED,
    OUTCOME_UNKNOWN,
    RELEASE_ACTOR,
    Item,
    Outcome,
    fail_all,
    outcome,
    pack,
)
from flashsale.core.record import new_order_id as new_order_id
from flashsale.core.replication import Replication
from flashsale.core.resolve import Resolver
from flashsale.core.scripts import VOIDED

log = logging.getLogger("flashsale.core.reserve")


@dataclass(slots=True)
class _Lane:
    """One sale's reservations waiting for a script call, and calls in flight."""

    waiting: list[Item] = field(default_factory=list)
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
        self._resolver = Resolver(backends)
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
        item = Item(user_id, quantity, idempotency_key, loop.create_future(), ticket)
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

    async def _run(self, sale_id: str, lane: _Lane, items: list[Item]) -> None:
        lost: tuple[list[Item], int, bool] | None = None
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
                    await self._resolver.release_unknown(
                        sale_id, lost_items, now_ms, unreplicated=True
                    )
                else:
                    await self._resolver.resolve(sale_id, lost_items, now_ms)
            finally:  # cancelled half way: nobody is left without an answer
                fail_all(lost[0], errors.Unavailable(OUTCOME_UNKNOWN))

    async def _decide(
        self, sale_id: str, items: list[Item]
    ) -> tuple[list[Item], int, bool] | None:
        """One script call for the items. Returns the items, the batch's now_ms
        and False when the reply was lost (the caller resolves them); the new
        orders, now_ms and True when too few replicas acknowledged the batch
        (the caller releases them); else None."""
        now_ms = int(time.time() * 1000)
        k = self._b.keys(sale_id)
        items = pack(k, items, now_ms)
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
            fail_all(items, errors.Unavailable(NOT_VERIFIED))
            return None
        except (RedisTimeoutError, RedisConnectionError, OSError):
            # sent, maybe run, the reply lost: find out before answering anyone
            return items, now_ms, False
        except RedisError as exc:  # refused by Redis (BUSY, OOM, ...): the script wrote nothing
            fail_all(items, errors.Unavailable(f"reservation failed: {exc}"))
            return None
        except BaseException:
            fail_all(items, errors.Unavailable(OUTCOME_UNKNOWN))
            raise
        decided: list[Outcome | errors.FlashsaleError] = []
        for i, item in enumerate(items):
            code, detail = int(results[2 * i]), as_text(results[2 * i + 1])
            # only a late copy of a lost request meets a void
            decided.append(errors.Unavailable(NOT_RESERVED) if code == VOIDED
                           else outcome(sale_id, item, code, detail))
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

    async def _claim(self, k: SaleKeys, items: list[Item]) -> list[Item]:
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
            fail_all(keyed, errors.Unavailable("Redis did not answer; nothing was reserved"))
        else:
            for item, prev in zip(keyed, claimed, strict=True):
                if prev is not None and prev != item.fingerprint:
                    item.future.set_result(KEY_REUSED)
        return [item for item in items if not item.future.done()]

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
