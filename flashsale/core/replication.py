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

On Redis Cluster the rule holds per shard: the script and the ``WAIT`` go to
the node that owns the sale's slot, on one connection of that node's own pool
(``on_one_connection``): the cluster client's pipeline would send ``WAIT``, a
keyless command, to every primary and add their answers up. A ``MOVED``
(the slot's owner changed: a failover or a resharding) patches the client's
slot map and sends again (the script did not run); a broken link is resolved
as on one Redis (reserve.py, through the cluster client, which refreshes its
map on the error).

``WAIT`` waits for the replication offset of the connection's last write. A
batch that wrote nothing (only idempotent replays) has no such write, yet a
replay of an accepted order must not be answered before that order is
replicated: then one write to the sale's fence key and a ``WAIT`` after it
(any connection: the fence comes after the replayed order in the replication
stream) confirm it.

When too few replicas acknowledge in time (``settle``), nothing of the batch
is answered as decided:

* the batch's new orders go through the SAME release as a lost reply that
  Redis could not resolve (reserve.py ``_release_unknown``: the compensator's
  protocol for orders not persisted yet -- inserted already ``failed`` with
  their release row, ``ON CONFLICT DO NOTHING``, whoever commits the order
  row first wins; then ``resolve_orders`` voids what is not held and
  ``release`` returns what is, the outbox finishing it after a crash). A
  keyed one also has its "accepted" idempotency record forgotten
  (``forget_accepted``, lua/forget_idempotency.lua) once the release is
  committed, so that a retry decides afresh instead of replaying a released
  order. They answer 503 "nothing reserved"; if PostgreSQL does not answer,
  the contract's "outcome unknown, retry with the same key". An order the
  consumer persisted first stands (202): PostgreSQL has it, and a promoted
  replica that lacks it is rebuilt from PostgreSQL before it reserves
  (backends.RestartGuard, web/rebuilds.py);
* replays of accepted orders answer "outcome unknown" (the order is another
  request's, it may yet be confirmed; the retry tells);
* later, a replay naming an order such a release released (its record could
  not be forgotten: a primary cut off from its replica refuses every write)
  is forgotten then and answered 503 "nothing reserved", never 202;
* refusals answer 503 "nothing reserved" (true: a refusal holds nothing).

The primary should run with ``min-replicas-to-write`` >= the acks so that a
primary cut off from its replicas refuses the scripts outright (NOREPLICAS:
503 "nothing reserved") instead of timing out every batch
(flashsale/run/embedded/sentinel.py starts its nodes so).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import asyncpg
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import PipelineCommand
from redis.exceptions import MovedError, NoScriptError, RedisError
from redis.typing import EncodableT

from flashsale import errors
from flashsale.core.backends import Backends
from flashsale.core.scripts import RedisClient

log = logging.getLogger("flashsale.core.replication")

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

    @property
    def order_id(self) -> str: ...  # made for this call: an acceptance naming it is new
    @property
    def user_id(self) -> str: ...
    @property
    def idempotency_key(self) -> str | None: ...


class Decided(Protocol):
    """An outcome of the script for one item (reserve.Accepted or reserve.Refused),
    or the error it already answers."""

    @property
    def replay(self) -> bool: ...


def _order_id(o: object) -> str | None:
    oid = getattr(o, "order_id", None)
    return oid if isinstance(oid, str) else None


class Replication:
    """WAIT after each reservation batch; say which items may not be answered
    as decided when it falls short."""

    def __init__(self, backends: Backends, release_actor: str) -> None:
        s = backends.settings
        self._b = backends
        self.acks = s.redis_replica_acks
        self.timeout_ms = s.redis_replica_ack_timeout_ms
        self._release_actor = release_actor  # who releases an unreplicated batch (reserve.py)

    async def reserve_batch(self, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, int]:
        """The reserve_batch script and ``WAIT`` on one connection: (the script's
        result, the number of replicas that acknowledged its writes). ``keys[0]``
        is the sale's key (its slot names the node on Redis Cluster). Raises as
        the script call would (a broken link or a timeout: the reply is lost)."""
        b = self._b
        script = b.scripts.reserve_batch
        for _attempt in range(2):  # NOSCRIPT: load and send again (the script did not run)
            result, acked = await on_one_connection(b.redis, str(keys[0]), [
                ("EVALSHA", script.sha, len(keys), *keys, *args),
                ("WAIT", self.acks, self.timeout_ms),
            ])
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
        k = b.keys(sale_id)
        try:
            done, acked = await on_one_connection(b.redis, k.sale, [
                ("SET", k.fence, str(int(time.time() * 1000)), "PX", FENCE_TTL_MS),
                ("WAIT", self.acks, self.timeout_ms),
            ])
        except (RedisError, OSError) as exc:
            done = acked = exc
        if isinstance(done, BaseException) or isinstance(acked, BaseException):
            log.warning("replication fence of sale %s failed: %r / %r", sale_id, done, acked)
            return False
        return int(acked) >= self.acks

    async def settle(
        self, sale_id: str, items: Sequence[Item], decided: Sequence[Decided | Exception],
        acked: int,
    ) -> tuple[dict[int, errors.FlashsaleError], list[int]]:
        """(index -> the 503 to answer instead of the decided outcome, indexes
        of the new orders to release before answering: reserve.py's release of
        an unknown outcome). Both empty when the batch is replicated."""
        new = [i for i, o in enumerate(decided)
               if not isinstance(o, Exception) and _order_id(o) == items[i].order_id]
        replays = [i for i, o in enumerate(decided)
                   if not isinstance(o, Exception) and i not in new and _order_id(o) is not None]
        if acked >= self.acks:
            # the WAIT covers every write up to the batch's last one; replayed
            # orders (another request's, or this call's own when the client
            # resent it) need a write after them if the batch made no new order
            replayed = [i for i in (*new, *replays) if not isinstance(decided[i], Exception)
                        and decided[i].replay]  # type: ignore[union-attr]
            if not replayed:
                return {}, []
            instead = await self._replays_of_released(sale_id, items, decided, replayed)
            replayed = [i for i in replayed if i not in instead]
            fresh = any(not decided[i].replay for i in new)  # type: ignore[union-attr]
            if replayed and not fresh and not await self.confirm_fence(sale_id):
                instead.update({i: errors.Unavailable(NOT_REPLICATED_UNKNOWN) for i in replayed})
            return instead, []
        log.warning("reservation batch of sale %s: %d of %d replica(s) acknowledged in %d ms; "
                    "releasing its %d new order(s)", sale_id, acked, self.acks, self.timeout_ms,
                    len(new), extra={"unreplicated_orders": len(new)})
        out: dict[int, errors.FlashsaleError] = {}
        for i, o in enumerate(decided):
            if i in new or isinstance(o, Exception):
                continue
            out[i] = errors.Unavailable(NOT_REPLICATED_UNKNOWN if i in replays else NOT_REPLICATED)
        return out, new

    async def _replays_of_released(
        self, sale_id: str, items: Sequence[Item], decided: Sequence[Decided | Exception],
        replayed: Sequence[int],
    ) -> dict[int, errors.FlashsaleError]:
        """Replays naming an order that an unreplicated batch had released: its
        record could not be forgotten then (Redis refused writes, e.g. a
        primary without its replica: min-replicas-to-write), and a replay would
        answer 202 for a released order. They are forgotten now and answered
        503 "nothing reserved" (the next retry decides afresh); "outcome
        unknown" when PostgreSQL cannot tell. One query, only for batches with
        replays."""
        ids = {i: _order_id(decided[i]) or "" for i in replayed}
        try:
            async with asyncio.timeout(self._b.settings.pg_timeout_s):
                rows = await self._b.pg.fetch(
                    "SELECT order_id FROM releases WHERE order_id = ANY($1::text[]) "
                    "AND actor = $2 AND reason = 'failed'",
                    sorted(set(ids.values())), self._release_actor,
                )
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            log.warning("replays of sale %s not checked against PostgreSQL: %r", sale_id, exc)
            return {i: errors.Unavailable(NOT_REPLICATED_UNKNOWN) for i in replayed}
        released = {r["order_id"] for r in rows}
        gone = [i for i in replayed if ids[i] in released]
        keyed = [(items[i].user_id, key, ids[i]) for i in gone
                 if (key := items[i].idempotency_key) is not None]
        try:
            await forget_accepted(self._b, sale_id, keyed)
        except (RedisError, OSError) as exc:  # the next retry tries again
            log.warning("forgetting %d released orders' keys failed: %r", len(keyed), exc)
        return {i: errors.Unavailable(NOT_REPLICATED) for i in gone}


async def forget_accepted(b: Backends, sale_id: str, keyed: Sequence[tuple[str, str, str]]) -> int:
    """Forget the "accepted" idempotency records of released orders, given as
    (user_id, idempotency_key, order_id): a record naming another order, or a
    refusal, stays. Run only after the release committed in PostgreSQL, so a
    retry that decides afresh never holds a second live order under the key.
    Returns the number forgotten; raises RedisError/OSError when Redis fails."""
    if not keyed:
        return 0
    k = b.keys(sale_id)
    forgotten = await b.scripts.forget_idempotency(
        keys=[k.idempotency(user, key) for user, key, _oid in keyed],
        args=[oid for _user, _key, oid in keyed],
    )
    return int(forgotten)


async def on_one_connection(
    redis: RedisClient, sale_key: str, commands: Sequence[tuple[EncodableT, ...]]
) -> list[Any]:
    """``commands`` sent together without MULTI on ONE connection to the server
    that holds ``sale_key`` (``WAIT`` counts the writes of its own connection):
    their results in order, a command's error reply as its result. Raises
    when the link breaks before the first reply.

    Redis Cluster: a pipeline on the sale's node's own pool
    (``ClusterNode.execute_pipeline``, redis-py's per-node pipeline); a
    ``MOVED`` reply to the first command (nothing ran there) patches the slot
    map and sends once again, to the new owner."""
    if not isinstance(redis, RedisCluster):
        async with redis.pipeline(transaction=False) as pipe:
            for cmd in commands:
                pipe.execute_command(*cmd)
            return list(await pipe.execute(raise_on_error=False))
    await redis.initialize()  # the first call, or a refresh an earlier error asked for
    for _attempt in range(2):
        node = redis.get_node_from_key(sale_key)
        assert node is not None  # None only when asked for a replica
        sent = [PipelineCommand(i, *cmd) for i, cmd in enumerate(commands)]
        await node.execute_pipeline(sent)
        first = sent[0].result
        if not isinstance(first, MovedError):
            return [c.result for c in sent]
        await redis.nodes_manager.move_slot(first)
    return [c.result for c in sent]
