"""The reservation path: every check and every write in one Lua call.

Reservations for the same sale that arrive in the same event-loop tick are
coalesced into one ``reserve_batch`` call (one round trip for many buyers);
a lone request is a batch of one. Each item is still decided exactly as if
it ran alone (see lua/reserve_batch.lua).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flashsale import errors
from flashsale.backends import Backends
from flashsale.replication import Replication
from flashsale.scripts import ACCEPTED, REPLAY, RESERVE_ERRORS
from flashsale.validate import iso_ms

OUTCOME_UNKNOWN = (
    "the connection to Redis broke during the reservation; the outcome is unknown: retry "
    "with the same Idempotency-Key to get it"
)


def new_order_id(sale_id: str, now_ms: int) -> str:
    """Time-ordered, globally unique, and names its sale (routing in Redis)."""
    return f"{sale_id}-{now_ms:011x}{secrets.token_hex(5)}"


@dataclass(frozen=True, slots=True)
class Accepted:
    order_id: str
    sale_id: str
    user_id: str
    quantity: int
    amount_cents: int
    expires_ms: int
    replay: bool

    def body(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "sale_id": self.sale_id,
            "user_id": self.user_id,
            "quantity": self.quantity,
            "amount_cents": self.amount_cents,
            "status": "pending",
            "expires_at": iso_ms(self.expires_ms),
        }


@dataclass(slots=True)
class _Item:
    user_id: str
    quantity: int
    idempotency_key: str | None
    future: asyncio.Future[Outcome]
    order_id: str = field(default="")
    created_ms: int = 0


def fingerprint(sale_id: str, quantity: int) -> str:
    return f"{sale_id}|{quantity}"


def _decode(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _accepted(sale_id: str, user_id: str, detail: str, replay: bool) -> Accepted:
    order_id, qty, amount, expires = detail.split("\t")
    return Accepted(order_id, sale_id, user_id, int(qty), int(amount), int(expires), replay)


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


def _outcome(sale_id: str, item: _Item, code: int, detail: str) -> Outcome:
    """Map one script result (see lua/reserve_batch.lua) to its outcome."""
    if code == ACCEPTED:
        return _accepted(sale_id, item.user_id, detail, replay=False)
    if code == REPLAY:
        _fp, stored_code, stored_detail = detail.split("\n", 2)
        if int(stored_code) == ACCEPTED:
            return _accepted(sale_id, item.user_id, stored_detail, replay=True)
        return _REFUSED_REPLAY[int(stored_code)]
    return _REFUSED[code]


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
        self._replication = Replication(backends) if s.redis_replica_acks > 0 else None

    def queued(self) -> int:
        return sum(len(lane.waiting) for lane in self._lanes.values())

    async def reserve(
        self, sale_id: str, user_id: str, quantity: int, idempotency_key: str | None
    ) -> Outcome:
        lane = self._lanes.get(sale_id)
        if lane is None:
            lane = self._lanes[sale_id] = _Lane()
        if len(lane.waiting) >= self._queue_max:
            raise errors.Overloaded()
        loop = asyncio.get_running_loop()
        item = _Item(user_id, quantity, idempotency_key, loop.create_future())
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
        try:
            await self._decide(sale_id, items)
        finally:
            lane.inflight -= 1
            if lane.waiting:
                self._schedule(sale_id, lane)
            elif lane.inflight == 0 and self._lanes.get(sale_id) is lane:
                del self._lanes[sale_id]

    async def _decide(self, sale_id: str, items: list[_Item]) -> None:
        try:
            results, acked = await self._call(sale_id, items)
        except RedisTimeoutError:
            self._fail_all(items, errors.Unavailable(
                "Redis did not answer in time; the outcome is unknown: retry with the same "
                "Idempotency-Key to get it"
            ))
            return
        except (RedisConnectionError, OSError):
            # the link may have broken after the script ran (the reply was lost):
            # never claim that nothing was reserved
            self._fail_all(items, errors.Unavailable(OUTCOME_UNKNOWN))
            return
        except RedisError as exc:
            self._fail_all(items, errors.Unavailable(f"reservation failed: {exc}"))
            return
        except BaseException:
            self._fail_all(items, errors.Unavailable(OUTCOME_UNKNOWN))
            raise
        outcomes = [
            _outcome(sale_id, item, int(results[2 * i]), _decode(results[2 * i + 1]))
            for i, item in enumerate(items)
        ]
        unconfirmed: dict[int, errors.FlashsaleError] = {}
        if self._replication is not None:  # answered only once replicated (replication.py)
            unconfirmed = await self._replication.settle(sale_id, items, outcomes, acked)
        for i, item in enumerate(items):
            if item.future.done():
                continue
            if i in unconfirmed:
                item.future.set_exception(unconfirmed[i])
            else:
                item.future.set_result(outcomes[i])

    async def _call(self, sale_id: str, items: list[_Item]) -> tuple[list[Any], int]:
        """The script's flat result, and how many replicas acknowledged it (0
        when replica acknowledgement is off)."""
        b = self._b
        k = b.keys(sale_id)
        now_ms = int(time.time() * 1000)
        keys = [k.sale, k.users, k.holds, k.pending, k.stream]
        args: list[Any] = [now_ms, b.settings.idempotency_ttl_s, len(items)]
        for item in items:
            item.order_id = new_order_id(sale_id, now_ms)
            item.created_ms = now_ms
            if item.idempotency_key is None:
                keys.append(k.sale)
                has_key, key_text = "0", ""
            else:
                keys.append(k.idempotency(item.user_id, item.idempotency_key))
                has_key, key_text = "1", item.idempotency_key
            args.append(
                f"{item.order_id}\x1f{item.user_id}\x1f{item.quantity}\x1f{has_key}\x1f"
                f"{fingerprint(sale_id, item.quantity)}\x1f{key_text}"
            )
        if self._replication is not None:
            replicated: tuple[list[Any], int] = await self._replication.reserve_batch(keys, args)
            return replicated
        result: list[Any] = await b.scripts.reserve_batch(keys=keys, args=args)
        return result, 0

    @staticmethod
    def _fail_all(items: list[_Item], exc: errors.FlashsaleError) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(exc)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
