"""A reservation call that failed after it was sent (a timeout or a broken
link: the script may have run) is resolved before anyone is answered, so a
503 keeps the contract's promise that nothing was reserved. The order ids are
made before the call, so ``resolve_orders`` tells, in one atomic step on a
fresh connection, which were reserved (202) and voids the others (a late copy
of the request then reserves nothing). When Redis cannot be asked, a keyless
order is released through the release protocol (core/release.py); a keyed
one is 503 "outcome unknown, retry with the same key". A batch too few
replicas acknowledged (core/replication.py) is released through the same path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import asyncpg
from redis.asyncio import RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from flashsale import errors
from flashsale.core import release
from flashsale.core.clients import as_text
from flashsale.core.outcomes import (
    NOT_RESERVED,
    OUTCOME_UNKNOWN,
    RELEASE_ACTOR,
    RELEASE_DETAIL,
    RELEASED,
    RESOLVE_PAUSE_S,
    UNKNOWN_KEYLESS,
    UNREPLICATED_DETAIL,
    VOID_KEEP_MS,
    Accepted,
    Item,
    accepted,
    fail_all,
)
from flashsale.core.record import Order
from flashsale.core.record import new_order_id as new_order_id
from flashsale.core.replication import NOT_REPLICATED, forget_accepted
from flashsale.core.scripts import (
    ACCEPTED,
    ReserveCode,
)
from flashsale.core.statuses import HOLDING

if TYPE_CHECKING:
    from flashsale.core.backends import Backends

log = logging.getLogger(__name__)



class Resolver:
    """Resolution and release of the items of a lost or unreplicated batch."""

    def __init__(self, backends: Backends) -> None:
        self._b = backends

    async def resolve(self, sale_id: str, items: list[Item], now_ms: int) -> None:
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
                    item.future.set_result(accepted(sale_id, item, detail, replay=False))
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
        fail_all(keyed, errors.Unavailable(OUTCOME_UNKNOWN))
        if keyless:
            await self.release_unknown(sale_id, keyless, now_ms)

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

    async def release_unknown(
        self, sale_id: str, items: list[Item], now_ms: int, *, unreplicated: bool = False
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
            fail_all([i for i in items if i.idempotency_key is None],
                           errors.Unavailable(UNKNOWN_KEYLESS))
            fail_all(items, errors.Unavailable(OUTCOME_UNKNOWN))
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

