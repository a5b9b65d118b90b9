"""Acknowledged means replicated: a reservation batch is answered only once
``redis_replica_acks`` replicas have it (FLASHSALE_REDIS_REPLICA_ACKS).

Redis replication is asynchronous: a 202 sent as soon as the primary ran the
script is lost if the primary dies before its replica got the batch and the
replica is promoted. So, after each reservation batch script, ONE ``WAIT
numreplicas timeout`` for the whole batch, never one per request. ``WAIT``
covers the writes of the connection it is sent on, so the script and the
``WAIT`` go out together as one pipeline without MULTI: one connection, one
round trip (``reserve_batch`` below; NOSCRIPT reloads and sends again, the
script never ran).

``WAIT`` waits for the replication offset of the connection's last write. A
batch that wrote nothing (only idempotent replays) has no such write, yet a
replay of an accepted order must not be answered before that order is
replicated: then one write to the sale's fence key and a ``WAIT`` after it
(any connection: the fence comes after the replayed order in the replication
stream) confirm it.

When too few replicas acknowledge in time (``settle``), nothing of the batch
is answered as decided:

* the batch's new orders are released through the release protocol of
  compensate.py (step 1 in PostgreSQL: inserted already ``failed`` with their
  release row, or moved ``awaiting_payment -> failed`` if the consumer was
  quicker, each guarded so it happens once; step 2 in Redis: ``release``, its
  outbox finishes it after a crash), then their "accepted" idempotency
  records are forgotten (``forget_idempotency``), and they answer 503
  ``unavailable`` "nothing reserved". If step 1 cannot be done (PostgreSQL
  down) they answer the contract's "outcome unknown, retry with the same key";
* replays of accepted orders answer "outcome unknown" (the order is another
  request's, it may yet be confirmed; the retry tells);
* refusals answer 503 "nothing reserved" (true: a refusal holds nothing).

The primary should run with ``min-replicas-to-write`` >= the acks so that a
primary cut off from its replicas refuses the scripts outright (NOREPLICAS:
503 "nothing reserved") instead of timing out every batch
(flashsale/devservers/sentinel.py starts its nodes so).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol, TypeGuard

import asyncpg
from redis.exceptions import NoScriptError, RedisError

from flashsale import errors
from flashsale.backends import Backends
from flashsale.compensate import (
    Unpersisted,
    release,
    release_many_in_redis,
    release_many_unpersisted,
)

log = logging.getLogger("flashsale.replication")

ACTOR = "replication"
VOID_DETAIL = "not acknowledged by enough replicas in time"
FENCE_TTL_MS = 60_000
NOT_REPLICATED = (
    "Redis could not replicate the reservation in time; nothing was reserved: retry later"
)
NOT_REPLICATED_UNKNOWN = (
    "Redis could not replicate the reservation in time; the outcome is unknown: retry with "
    "the same Idempotency-Key to get it"
)


class Item(Protocol):
    """What settle reads of one batch item (reserve._Item)."""

    user_id: str
    quantity: int
    idempotency_key: str | None
    order_id: str  # made for this call: an accepted outcome with it is this call's order
    created_ms: int


class Decided(Protocol):
    """An outcome of the script for one item (reserve.Accepted or reserve.Refused)."""

    @property
    def replay(self) -> bool: ...


class AcceptedOrder(Decided, Protocol):
    """reserve.Accepted."""

    @property
    def order_id(self) -> str: ...
    @property
    def quantity(self) -> int: ...
    @property
    def amount_cents(self) -> int: ...
    @property
    def expires_ms(self) -> int: ...


def _is_accepted(o: Decided) -> TypeGuard[AcceptedOrder]:
    return hasattr(o, "order_id")


class Replication:
    """WAIT after each reservation batch; release the batch when it falls short."""

    def __init__(self, backends: Backends) -> None:
        s = backends.settings
        self._b = backends
        self.acks = s.redis_replica_acks
        self.timeout_ms = s.redis_replica_ack_timeout_ms

    async def reserve_batch(self, keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, int]:
        """The reserve_batch script and ``WAIT`` on one connection: (the script's
        result, the number of replicas that acknowledged its writes)."""
        b = self._b
        script = b.scripts.reserve_batch
        for _attempt in range(2):  # NOSCRIPT: load and send again (the script did not run)
            async with b.redis.pipeline(transaction=False) as pipe:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.wait(self.acks, self.timeout_ms)
                result, acked = await pipe.execute(raise_on_error=False)
            if isinstance(result, NoScriptError):
                await b.redis.script_load(script.script)
                continue
            if isinstance(result, BaseException):
                raise result
            if isinstance(acked, BaseException):  # the script ran: its writes stand unconfirmed
                log.warning("WAIT failed after a reservation batch: %r", acked)
                acked = 0
            return result, int(acked)
        raise RedisError("reserve_batch: NOSCRIPT after loading the script")

    async def confirm_fence(self, sale_id: str) -> bool:
        """Everything written before now is on ``acks`` replicas (a fence write,
        then WAIT on its connection); False when not in time or on an error."""
        b = self._b
        try:
            async with b.redis.pipeline(transaction=False) as pipe:
                pipe.set(b.keys(sale_id).fence, str(int(time.time() * 1000)), px=FENCE_TTL_MS)
                pipe.wait(self.acks, self.timeout_ms)
                _ok, acked = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("replication fence of sale %s failed: %r", sale_id, exc)
            return False
        return int(acked) >= self.acks

    async def settle(
        self, sale_id: str, items: Sequence[Item], outcomes: Sequence[Decided], acked: int
    ) -> dict[int, errors.FlashsaleError]:
        """The items that may not be answered with their outcome: index -> the
        503 to answer instead (see the module docstring). Empty when the batch
        is replicated."""
        accepted = {i: o for i, o in enumerate(outcomes) if _is_accepted(o)}
        new = [i for i, o in accepted.items() if o.order_id == items[i].order_id]
        replays = [i for i in accepted if i not in new]
        if acked >= self.acks:
            # the WAIT covers every write up to the batch's last one; replayed
            # orders (another request's, or this call's own when the client
            # resent it) need a write after them if the batch made no new order
            replayed = [i for i in (*new, *replays) if outcomes[i].replay]
            fresh = any(not outcomes[i].replay for i in new)
            if not replayed or fresh or await self.confirm_fence(sale_id):
                return {}
            return {i: errors.Unavailable(NOT_REPLICATED_UNKNOWN) for i in replayed}
        log.warning("reservation batch of sale %s: %d of %d replica(s) acknowledged in %d ms; "
                    "releasing its %d new order(s)", sale_id, acked, self.acks, self.timeout_ms,
                    len(new))
        voided = await self.void(sale_id, [(items[i], accepted[i]) for i in new])
        out: dict[int, errors.FlashsaleError] = {}
        for i in range(len(outcomes)):
            if i in new:
                out[i] = errors.Unavailable(
                    NOT_REPLICATED if items[i].order_id in voided else NOT_REPLICATED_UNKNOWN
                )
            elif i in replays:
                out[i] = errors.Unavailable(NOT_REPLICATED_UNKNOWN)
            else:
                out[i] = errors.Unavailable(NOT_REPLICATED)
        return out

    async def void(
        self, sale_id: str, orders: Sequence[tuple[Item, AcceptedOrder]]
    ) -> set[str]:
        """Release these just-reserved orders, each exactly once; returns the ids
        released in PostgreSQL (nothing reserved: the Redis step, if it fails
        here, is finished by the compensator's outbox)."""
        if not orders:
            return set()
        b = self._b
        unpersisted = [
            Unpersisted(
                order_id=item.order_id, sale_id=sale_id, user_id=item.user_id,
                quantity=acc.quantity, amount_cents=acc.amount_cents,
                created_ms=item.created_ms, expires_ms=acc.expires_ms,
                idempotency_key=item.idempotency_key,
            )
            for item, acc in orders
        ]
        voided: set[str] = set()
        try:
            voided |= await release_many_unpersisted(b, unpersisted, "failed", ACTOR, VOID_DETAIL)
            for o in unpersisted:
                if o.order_id in voided:
                    continue  # the consumer persisted it meanwhile: move it to failed
                done = await release(b, o.order_id, "failed", ACTOR, detail=VOID_DETAIL)
                if done is not None:
                    voided.add(o.order_id)
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            log.warning("voiding unreplicated orders of sale %s failed: %r", sale_id, exc)
        if not voided:
            return voided
        k = b.keys(sale_id)
        try:
            await release_many_in_redis(b, [(oid, sale_id) for oid in sorted(voided)])
        except (RedisError, OSError, asyncpg.PostgresError) as exc:  # the outbox finishes it
            log.warning("release in Redis of voided orders of sale %s pending: %r", sale_id, exc)
        keyed = [(item.user_id, item.idempotency_key, item.order_id) for item, _acc in orders
                 if item.order_id in voided and item.idempotency_key is not None]
        if keyed:
            try:
                await b.scripts.forget_idempotency(
                    keys=[k.idempotency(u, key) for u, key, _o in keyed],
                    args=[o for _u, _k, o in keyed],
                )
            except (RedisError, OSError) as exc:  # a retry then replays the failed order
                log.warning("forgetting voided orders' keys of sale %s failed: %r", sale_id, exc)
        return voided
