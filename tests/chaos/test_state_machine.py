"""A Hypothesis state machine against the real service, checked against a model.

The service runs in-process (tests.commerce.running_shop: the HTTP front on a
real port, the mock gateway and carrier) on real Redis and PostgreSQL, in an
event loop of its own in a thread: Hypothesis' stateful runner is
synchronous, so every rule hands a coroutine to that loop and waits. The
consumer, compensator and saga are not running in the background: the rules
drive them, so each step's outcome is deterministic and the model exact.

**The model** (per example: one sale, three buyers, a second sale for
cross-sale key reuse) holds the stock, each order's status, quantity, buyer,
key and payment, and each Idempotency-Key's first decided reply. Rules:

* ``reserve``: a random buyer, quantity and (maybe) a fresh key; 202, or 409
  ``limit_exceeded`` / ``sold_out`` exactly when the model says so;
* ``replay``: an earlier key with the same body (the first reply again: same
  status, same ``order_id`` or code), a different quantity or another sale
  (422 ``idempotency_key_reused``);
* ``reserve_reply_lost``: a reservation through a TCP proxy (tests/chaos/faults.py)
  that loses its reply after the service handled it (the link reset, or the
  client timing out): the outcome is unknown to the client; the model learns
  it from Redis's pending orders, and a retry with the same key must get the
  first answer (one reservation per key);
* ``pay`` (201, the same ``payment_id`` on repeat, or 409
  ``order_not_payable``), ``settle`` through the mock gateway's admin
  endpoint or a webhook we sign ourselves (then replayed: ``duplicate``;
  and a forged copy: 400, nothing changes), with ``payment.succeeded`` or
  ``payment.failed``; a success for an order still ``pending`` is kept in the
  payment inbox (200 ``queued``) and applied, by the compensator's inbox
  round, as soon as the order is in PostgreSQL (persisted, or cancelled while
  pending); ``ship`` runs the fulfilment saga;
* ``cancel`` (200, or 409 ``order_not_cancellable``);
* ``expire``: an order's hold runs out. Waiting ``hold_seconds`` would make
  the test slow and timing-dependent, so the rule sets the order's
  ``expires_at`` in PostgreSQL one second in the past (what the clock would
  have done) and, when ``sweep`` is drawn, runs the compensator's expiry
  sweep; an order left lapsed but unswept is what a lagging compensator
  leaves: pay is refused, cancel still wins, a payment is refunded and the
  order expired; drawn again on a lapsed order, the sweep comes;
* ``restock``;
* ``consumer``: a consumer reads a batch (``XREADGROUP``) and dies before its
  ack, either before or after its PostgreSQL commit (its entries stay in its
  pending list; its name is abandoned); or a consumer (re)starts and drains:
  it reclaims what the dead left (``XAUTOCLAIM`` after
  ``consumer_claim_idle_ms``, 100 ms here) and persists the rest.

**Invariants after every step**: Redis ``available`` and ``stock`` (``GET
/sales/{id}``) equal the model's; no oversell (PostgreSQL ``sold`` ==
quantity held by its orders <= stock); each buyer's held quantity in Redis
equals the model's and stays within the per-user limit; every order's status
(PostgreSQL, or Redis's pending list for ``pending``) and every payment's
status equal the model's, and no order exists the model does not know; once
the stream is drained the ledger (``GET /admin/sales/{id}/ledger``) is
consistent and its figures are the model's. At the end of each example the
queues are drained and the history checker (tests/chaos/history.py) runs on
every reservation sent: lost 0, duplicated 0, unexpected 0.

A failure prints the minimal failing program (the rules with their
arguments) and a ``@reproduce_failure('<version>', b'<blob>')`` line: replay
exactly that example with FLASHSALE_SM_REPRODUCE="<version> <blob>". The run
is seeded (FLASHSALE_SM_SEED, default 20261122), so a whole run replays too. FLASHSALE_SM_EXAMPLES
(30) and FLASHSALE_SM_STEPS (40) bound it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeVar

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, reproduce_failure, seed
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from flashsale.commerce import orders as flashsale_orders
from flashsale.config import Settings
from flashsale.core import record
from flashsale.core.clients import as_text
from flashsale.core.compensate import Compensator
from flashsale.core.deduct import persist_batch
from flashsale.core.persist import Persister
from flashsale.ops.metrics import Metrics
from tests.chaos.conftest import Figures
from tests.chaos.faults import TcpProxy
from tests.chaos.history import (
    Fate,
    History,
    HttpReader,
    Operation,
    OpId,
    Outcome,
    Reader,
    Reply,
    ReserveRequest,
    Row,
    SaleState,
    classify,
    classify_sale,
)
from tests.commerce import FAST, Shop, running_shop

pytestmark = pytest.mark.chaos

T = TypeVar("T")

SEED = int(os.environ.get("FLASHSALE_SM_SEED", "20261122"))
MAX_EXAMPLES = int(os.environ.get("FLASHSALE_SM_EXAMPLES", "30"))
STEPS = int(os.environ.get("FLASHSALE_SM_STEPS", "40"))
REPRODUCE = os.environ.get("FLASHSALE_SM_REPRODUCE", "")
USERS = 3
PRICE = 500
CLAIM_IDLE_MS = 100
LOST_REPLY_TIMEOUT_S = 0.2
RESTOCKS_MAX = 3
STEP_TIMEOUT_S = 30.0
HOLDING = frozenset({"pending", "awaiting_payment", "paid", "shipped"})
RELEASED = frozenset({"cancelled", "expired", "failed"})
PICK = st.integers(0, 10**6)


class LoopThread:
    """An event loop running in a daemon thread; ``run`` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="state-machine-loop")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = STEP_TIMEOUT_S) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Env:
    """What every example of one run shares: the loop, the running app, the counters."""

    loop: LoopThread
    shop: Shop
    proxy: TcpProxy  # in front of the HTTP front: replies can be lost
    run_tag: str
    examples: int = 0
    steps: int = 0
    rules: Counter[str] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per rule, invariant
    outcomes: Counter[str] = field(default_factory=Counter)  # what the webhooks did
    reservations: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)


# --------------------------------------------------------------------------- the model


@dataclass
class MPayment:
    payment_id: str
    status: str  # requires_payment | failed | succeeded | refunded


@dataclass
class MOrder:
    order_id: str
    user: str
    qty: int
    key: str | None
    status: str = "pending"
    in_pg: bool = False  # an order row exists in PostgreSQL
    lapsed: bool = False  # its hold ran out (expires_at in the past), not swept yet
    payment: MPayment | None = None
    kept: int = 0  # payment.succeeded events in the payment inbox, not applied yet

    @property
    def amount(self) -> int:
        return PRICE * self.qty


@dataclass(frozen=True)
class FirstReply:
    """An Idempotency-Key's first decided answer, as the model expects it again."""

    qty: int
    status: int
    order_id: str | None
    code: str | None


class LedgerMachine(RuleBasedStateMachine):
    env: ClassVar[Env]

    def __init__(self) -> None:
        super().__init__()
        env = self.env
        env.examples += 1
        self.n = env.examples
        self.users = [f"sm{env.run_tag}-e{self.n}-u{i}" for i in range(USERS)]
        self.sale_id: str | None = None
        self.other_sale_id = ""
        self.stock = 0
        self.limit = 1
        self.orders: dict[str, MOrder] = {}
        self.keys: list[tuple[str, str]] = []
        self.first: dict[tuple[str, str], FirstReply] = {}
        self.history = History()
        self.crashed = 0  # entries left in the pending lists of dead consumers
        self.seq = 0
        self.restocks = 0
        self._rule = "init"

    # ------------------------------------------------------------------- helpers

    @property
    def shop(self) -> Shop:
        return self.env.shop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        started = time.monotonic()
        try:
            return self.env.loop.run(coro)
        finally:
            spent = time.monotonic() - started
            self.env.seconds[self._rule] = self.env.seconds.get(self._rule, 0.0) + spent

    def step(self, name: str) -> None:
        self.env.steps += 1
        self.env.rules[name] += 1
        self._rule = name

    def fresh(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}{self.n}-{self.seq}"

    @property
    def available(self) -> int:
        return self.stock - sum(o.qty for o in self.orders.values() if o.status in HOLDING)

    def held(self, user: str) -> int:
        return sum(o.qty for o in self.orders.values() if o.user == user and o.status in HOLDING)

    def pick(self, i: int, orders: list[MOrder]) -> MOrder:
        return orders[i % len(orders)]

    def expected_reserve(self, user: str, qty: int) -> tuple[int, str | None]:
        if self.held(user) + qty > self.limit:
            return 409, "limit_exceeded"
        if self.available < qty:
            return 409, "sold_out"
        return 202, None

    # ------------------------------------------------------------------- rules

    @initialize(stock=st.integers(0, 8), limit=st.integers(1, 3))
    def create_sale(self, stock: int, limit: int) -> None:
        self.step("create_sale")
        api = self.shop.api
        sale = self.run(api.create_sale(stock=stock, per_user_limit=limit, price_cents=PRICE))
        other = self.run(api.create_sale(stock=1, price_cents=PRICE))
        self.sale_id, self.other_sale_id = sale["sale_id"], other["sale_id"]
        self.stock, self.limit = stock, limit

    @rule(user=st.integers(0, USERS - 1), qty=st.integers(1, 3), keyed=st.booleans())
    def reserve(self, user: int, qty: int, keyed: bool) -> None:
        self.step("reserve")
        assert self.sale_id is not None
        buyer = self.users[user]
        key = self.fresh("k") if keyed else None
        want_status, want_code = self.expected_reserve(buyer, qty)
        self.env.reservations += 1
        outcome, reply = self.run(
            self.history.reserve(self.shop.api, self.sale_id, buyer, qty, key)
        )
        assert (reply.status, reply.code) == (want_status, want_code), reply
        if reply.status == 202:
            assert outcome is Outcome.OK and reply.order_id
            self.orders[reply.order_id] = MOrder(reply.order_id, buyer, qty, key)
        if key is not None:
            self.keys.append((buyer, key))
            self.first[(buyer, key)] = FirstReply(qty, want_status, reply.order_id, want_code)

    @precondition(lambda self: bool(self.keys))
    @rule(i=PICK, variant=st.sampled_from(["same", "other_quantity", "other_sale"]))
    def replay(self, i: int, variant: str) -> None:
        self.step(f"replay_{variant}")
        assert self.sale_id is not None
        buyer, key = self.keys[i % len(self.keys)]
        first = self.first[(buyer, key)]
        sale_id, qty = self.sale_id, first.qty
        if variant == "other_quantity":
            qty = first.qty % 3 + 1
        elif variant == "other_sale":
            sale_id = self.other_sale_id
        self.env.reservations += 1
        _, reply = self.run(self.history.reserve(self.shop.api, sale_id, buyer, qty, key))
        if variant == "same":
            assert (reply.status, reply.order_id, reply.code) == (
                first.status, first.order_id, first.code), (reply, first)
        else:
            assert (reply.status, reply.code) == (422, "idempotency_key_reused"), reply

    @rule(user=st.integers(0, USERS - 1), qty=st.integers(1, 3), keyed=st.booleans(),
          mode=st.sampled_from(["reset", "timeout"]), retry=st.booleans())
    def reserve_reply_lost(
        self, user: int, qty: int, keyed: bool, mode: str, retry: bool
    ) -> None:
        """The reservation runs, its reply is lost (the link is reset, or the client
        times out): the client's outcome is unknown. The model learns what happened
        from the sale's pending orders in Redis (exactly one new order when it had to
        be accepted, none otherwise); ``retry`` (with a key) asks again and must get
        the first decided answer."""
        self.step(f"reply_lost_{mode}")
        assert self.sale_id is not None
        buyer = self.users[user]
        key = self.fresh("k") if keyed else None
        want_status, want_code = self.expected_reserve(buyer, qty)
        self.env.reservations += 1
        before = self.run(self._pending_ids())
        outcome = self.run(self._lost_reply(buyer, qty, key, mode))
        assert outcome is Outcome.UNKNOWN, outcome
        new = self.run(self._pending_ids()) - before
        order_id = None
        if want_status == 202:
            assert len(new) == 1, new
            order_id = new.pop()
            pending = self.run(
                flashsale_orders.fetch_pending(self.shop.b, order_id, self.sale_id))
            assert pending is not None and (pending.user_id, pending.quantity) == (buyer, qty)
            self.orders[order_id] = MOrder(order_id, buyer, qty, key)
        else:
            assert not new, new
        if key is None:
            return
        self.keys.append((buyer, key))
        first = self.first[(buyer, key)] = FirstReply(qty, want_status, order_id, want_code)
        if retry:
            self.env.reservations += 1
            _, reply = self.run(
                self.history.reserve(self.shop.api, self.sale_id, buyer, qty, key))
            assert (reply.status, reply.order_id, reply.code) == (
                first.status, first.order_id, first.code), (reply, first)

    async def _pending_ids(self) -> set[str]:
        assert self.sale_id is not None
        b = self.shop.b
        return {as_text(o) for o in await b.redis.hkeys(b.keys(self.sale_id).pending)}

    async def _lost_reply(self, buyer: str, qty: int, key: str | None, mode: str) -> Outcome:
        assert self.sale_id is not None
        proxy = self.env.proxy
        op = self.history.invoke(self.sale_id, buyer, qty, key)
        headers = {**self.shop.api.buyer(buyer), "Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        url = f"http://127.0.0.1:{proxy.port}/api/v1/sales/{self.sale_id}/orders"
        timeout = aiohttp.ClientTimeout(total=LOST_REPLY_TIMEOUT_S if mode == "timeout" else 10)
        swallowed = proxy.stats.replies_swallowed
        if mode == "timeout":
            proxy.swallow_replies(True)
        else:
            proxy.drop_reply_once()
        try:
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True), timeout=timeout
            ) as session, session.post(
                url, data=orjson.dumps({"quantity": qty}), headers=headers
            ) as r:
                raw = await r.read()
            # the reply came through after all: a test fault, not the service's
            raise AssertionError(f"the proxy let a reply through: {r.status} {raw[:200]!r}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            if mode == "timeout":  # the client gave up; wait until the service has answered
                deadline = time.monotonic() + 10
                while proxy.stats.replies_swallowed == swallowed:
                    assert time.monotonic() < deadline, "the service never answered"
                    await asyncio.sleep(0.01)
            return self.history.fail(op, exc)
        finally:
            if mode == "timeout":
                proxy.swallow_replies(False)

    def among(self, i: int, live: bool, is_live: Callable[[MOrder], bool]) -> MOrder:
        """Order ``i`` among the live ones (``live`` drawn and there are some), else
        among all: random picks alone rarely walk an order through its whole life."""
        candidates = [o for o in self.orders.values() if is_live(o)] if live else []
        return self.pick(i, candidates or list(self.orders.values()))

    @precondition(lambda self: bool(self.orders))
    @rule(i=PICK, live=st.booleans(),
          then=st.sampled_from(["nothing", "succeeded", "failed"]))
    def pay(self, i: int, live: bool, then: str) -> None:
        """Request the payment; ``then`` the gateway settles it at once (a buyer who
        pays right away), or not (``settle`` may come later, or never)."""
        self.step("pay")
        o = self.among(i, live, lambda o: o.status in ("pending", "awaiting_payment")
                       and not o.lapsed and o.payment is None)
        status, body = self.run(self.shop.pay(o.order_id, o.user))
        if o.status in ("pending", "awaiting_payment") and not o.lapsed:
            assert status == 201, body
            assert body["amount_cents"] == o.amount and body["status"] == "requires_payment"
            if o.payment is None:
                o.payment = MPayment(body["payment_id"], "requires_payment")
            else:
                assert body["payment_id"] == o.payment.payment_id, (body, o.payment)
                o.payment.status = "requires_payment"  # a failed attempt is payable again
            if then != "nothing":
                self.settle_one(o, then, "gateway")
        else:
            assert (status, body["error"]["code"]) == (409, "order_not_payable"), (o, body)

    def webhook_effect(self, o: MOrder, outcome: str) -> tuple[int, str | None]:
        """Apply one gateway event to the model: (webhook status, its outcome)."""
        p = o.payment
        assert p is not None
        if outcome == "failed":
            if p.status == "requires_payment":
                p.status = "failed"
                return 200, "payment_failed"
            return 200, "no_change"
        if not o.in_pg:
            o.kept += 1  # not persisted yet: kept in the inbox, applied once it is
            return 200, "queued"
        if p.status not in ("requires_payment", "failed"):
            return 200, "no_change"
        if o.status == "awaiting_payment" and not o.lapsed:
            o.status, p.status = "paid", "succeeded"
            return 200, "paid"
        if o.status == "awaiting_payment":  # lapsed, unswept: expired right there
            o.status, p.status = "expired", "refunded"
            return 200, "refunded"
        assert o.status in RELEASED, o
        p.status = "refunded"
        return 200, "refunded"

    @precondition(lambda self: any(o.payment for o in self.orders.values()))
    @rule(i=PICK, outcome=st.sampled_from(["succeeded", "failed"]),
          via=st.sampled_from(["gateway", "signed"]), live=st.booleans())
    def settle(self, i: int, outcome: str, via: str, live: bool) -> None:
        self.step(f"settle_{via}")
        paid_for = [o for o in self.orders.values() if o.payment]
        unsettled = [o for o in paid_for if o.in_pg and o.payment is not None
                     and o.payment.status in ("requires_payment", "failed")]
        self.settle_one(self.pick(i, unsettled if live and unsettled else paid_for), outcome, via)

    def settle_one(self, o: MOrder, outcome: str, via: str) -> None:
        assert o.payment is not None
        payment = {"payment_id": o.payment.payment_id, "order_id": o.order_id,
                   "amount_cents": o.amount}
        want_status, want_outcome = self.webhook_effect(o, outcome)
        self.env.outcomes[f"webhook_{want_outcome or want_status}"] += 1
        if via == "gateway":
            status, body = self.run(self.shop.settle(o.payment.payment_id, outcome))
            assert status == 200, body
            got_status, got = body["webhook_status"], body["webhook_response"]
        else:
            event = Shop.event(payment, kind=f"payment.{outcome}")
            forged = self.run(self.shop.webhook(event, secret="not-the-secret-0123456789abc"))
            assert (forged[0], forged[1]["error"]["code"]) == (400, "invalid_signature"), forged
            got_status, got = self.run(self.shop.webhook(event))
            again_status, again = self.run(self.shop.webhook(event))
            if got_status == 200:
                assert (again_status, again["outcome"]) == (200, "duplicate"), again
            else:
                assert again_status == got_status, again
        assert got_status == want_status, (got_status, got, o)
        if want_outcome is not None:
            assert got["outcome"] == want_outcome, (got, o)

    @precondition(lambda self: any(o.status == "paid" for o in self.orders.values()))
    @rule()
    def ship(self) -> None:
        self.step("ship")
        self.run(self.shop.saga().step())
        for o in self.orders.values():
            if o.status == "paid":
                o.status = "shipped"

    @precondition(lambda self: bool(self.orders))
    @rule(i=PICK)
    def cancel(self, i: int) -> None:
        self.step("cancel")
        o = self.pick(i, list(self.orders.values()))
        status, body = self.run(self.shop.cancel(o.order_id, o.user))
        if o.status in ("pending", "awaiting_payment"):
            assert (status, body["status"]) == (200, "cancelled"), (o, body)
            o.status, o.in_pg = "cancelled", True
            self.apply_inbox()
        else:
            assert (status, body["error"]["code"]) == (409, "order_not_cancellable"), (o, body)

    @precondition(lambda self: any(
        o.status == "awaiting_payment" for o in self.orders.values()))
    @rule(i=PICK, sweep=st.booleans())
    def expire(self, i: int, sweep: bool) -> None:
        """An order's hold runs out (``sweep``: and the compensator sweeps at once;
        otherwise it lags). Drawn on an order already lapsed: the sweep comes now."""
        live = [o for o in self.orders.values() if o.status == "awaiting_payment"]
        o = self.pick(i, live)
        if o.lapsed:
            self.step("compensate")
            self._sweep()
            return
        self.step("expire_swept" if sweep else "expire_lapsed")
        done = self.run(self.shop.b.pg.execute(
            "UPDATE orders SET expires_at = now() - interval '1 second' WHERE order_id = $1 "
            "AND status = 'awaiting_payment'", o.order_id,
        ))
        assert done == "UPDATE 1", done
        o.lapsed = True
        if sweep:
            self._sweep()

    def _sweep(self) -> None:
        """The compensator's expiry sweep (over the whole database: an earlier, failed
        example may have left lapsed orders of its own sale; the invariant checks ours)."""
        due = [o for o in self.orders.values() if o.lapsed and o.status == "awaiting_payment"]
        expired = self.run(Compensator(self.shop.b, Metrics(), name="sm").expire_due())
        assert expired >= len(due), (expired, due)
        for o in due:
            o.status = "expired"

    @precondition(lambda self: self.restocks < RESTOCKS_MAX)
    @rule(qty=st.integers(1, 3))
    def restock(self, qty: int) -> None:
        """(At most RESTOCKS_MAX per example: with one argument it is among Hypothesis's
        "simplest" rules, and examples made of restocks alone test little.)"""
        self.step("restock")
        self.restocks += 1
        status, body, _ = self.run(self.shop.api.request(
            "POST", f"/api/v1/sales/{self.sale_id}/restock", json={"quantity": qty},
            headers=self.shop.api.admin,
        ))
        assert status == 200, body
        self.stock += qty
        assert (body["stock"], body["available"]) == (self.stock, self.available), body

    @rule(action=st.sampled_from(["restart", "crash_before_commit", "crash_after_commit"]),
          count=st.integers(1, 4))
    def consumer(self, action: str, count: int) -> None:
        """A consumer dies mid-batch (before or after its commit), or one (re)starts
        and drains the stream. One rule, so that the consumer's share of the steps
        leaves room for the payment rules."""
        if action == "restart":
            self.drain()
        else:
            self.crash_consumer(count, action == "crash_after_commit")

    def crash_consumer(self, count: int, after_commit: bool) -> None:
        self.step("crash_after_commit" if after_commit else "crash_before_commit")
        read = self.run(self._crash(count, after_commit))
        self.crashed += len(read)
        if after_commit:
            for order_id in read:
                o = self.orders[order_id]
                if not o.in_pg:
                    o.status, o.in_pg = "awaiting_payment", True
            self.apply_inbox()

    async def _crash(self, count: int, after_commit: bool) -> list[str]:
        """A consumer reads up to ``count`` entries and dies before acking them."""
        assert self.sale_id is not None
        b = self.shop.b
        name = self.fresh("doomed-")
        resp: Any = await b.redis.xreadgroup(
            b.settings.consumer_group, name, {b.keys(self.sale_id).stream: ">"}, count=count
        )
        entries = [record.from_entry(self.sale_id, eid.decode(), fields)
                   for _stream, items in resp or [] for eid, fields in items]
        if after_commit and entries:
            async with b.pg.acquire() as conn:
                failed = await persist_batch(conn, entries, name)
            assert not failed, failed
        return [e.order_id for e in entries]

    def drain(self) -> None:
        self.step("drain")
        self.run(self._drain())
        for o in self.orders.values():
            if not o.in_pg:
                o.status, o.in_pg = "awaiting_payment", True
        self.apply_inbox()

    def apply_inbox(self) -> None:
        """The compensator's payment-inbox round, right after orders reached
        PostgreSQL: each kept event has the effect a delivery would have now."""
        if not any(o.kept and o.in_pg for o in self.orders.values()):
            return
        self.run(self._apply_inbox())
        for o in self.orders.values():
            if o.in_pg:
                while o.kept:
                    o.kept -= 1
                    self.webhook_effect(o, "succeeded")

    async def _apply_inbox(self) -> None:
        """Every kept event due now (its backoff is what the clock would have run
        out; those of orders still pending are pushed out again), rounds until none."""
        b = self.shop.b
        await b.pg.execute(
            "UPDATE payment_inbox SET next_attempt_at = now() WHERE applied_at IS NULL")
        comp = Compensator(b, Metrics(), name="sm-inbox")
        while await comp.apply_payment_inbox():
            pass

    async def _drain(self) -> None:
        """A consumer (re)starts: reclaims what dead consumers left, persists the rest."""
        assert self.sale_id is not None
        b = self.shop.b
        if self.crashed:
            await asyncio.sleep(CLAIM_IDLE_MS * 1.5 / 1000)
        persister = Persister(b, Metrics(), name=self.fresh("restarted-"))
        stream = b.keys(self.sale_id).stream
        deadline = time.monotonic() + 20
        while int(await b.redis.xlen(stream)):
            assert time.monotonic() < deadline, "stream not drained in 20 s"
            await persister.step()
        self.crashed = 0

    # ------------------------------------------------------------------- invariants

    @invariant()
    def service_agrees_with_model(self) -> None:
        if self.sale_id is not None:
            self._rule = "invariant"
            self.run(self._agrees())

    async def _agrees(self) -> None:
        assert self.sale_id is not None
        api, b, sale_id = self.shop.api, self.shop.b, self.sale_id
        k = b.keys(sale_id)

        async def redis_reads() -> list[Any]:
            async with b.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(k.users)
                pipe.hkeys(k.pending)
                pipe.xlen(k.stream)
                return list(await pipe.execute())

        # nothing runs in the background: the reads may go concurrently
        (status, sale, _), (users_raw, pending_raw, stream_len), rows_raw, sold, pay_rows, led = (
            await asyncio.gather(
                api.request("GET", f"/api/v1/sales/{sale_id}"), redis_reads(),
                b.pg.fetch("SELECT order_id, status, quantity FROM orders WHERE sale_id = $1",
                           sale_id),
                b.pg.fetchval("SELECT sold FROM sales WHERE sale_id = $1", sale_id),
                b.pg.fetch("SELECT order_id, payment_id, status FROM payments "
                           "WHERE sale_id = $1", sale_id),
                api.ledger(sale_id),
            ))
        assert status == 200, sale
        assert (sale["stock"], sale["available"]) == (self.stock, self.available), (
            f"service stock/available {sale['stock']}/{sale['available']}, "
            f"model {self.stock}/{self.available}")
        assert self.available >= 0  # the model never oversells; neither may the service
        users = {as_text(u): int(q) for u, q in users_raw.items()}
        model_users = {u: self.held(u) for u in self.users if self.held(u)}
        assert users == model_users, (users, model_users)
        assert all(q <= self.limit for q in users.values()), users

        rows = {r["order_id"]: r for r in rows_raw}
        pending = {as_text(o) for o in pending_raw}
        assert set(rows) <= set(self.orders), set(rows) - set(self.orders)
        for o in self.orders.values():
            if o.in_pg:
                assert o.order_id in rows and rows[o.order_id]["status"] == o.status, (
                    o, rows.get(o.order_id))
            else:
                assert o.order_id not in rows and o.order_id in pending, o
        held = sum(int(r["quantity"]) for r in rows.values()
                   if r["status"] in ("awaiting_payment", "paid", "shipped"))
        assert sold == held <= self.stock, (sold, held, self.stock)

        payments = {r["order_id"]: (r["payment_id"], r["status"]) for r in pay_rows}
        model_payments = {o.order_id: (o.payment.payment_id, o.payment.status)
                          for o in self.orders.values() if o.payment}
        assert payments == model_payments, (payments, model_payments)

        if int(stream_len) == 0:  # drained: the ledger balances, with the model's figures
            sums = Counter[str]()
            for o in self.orders.values():
                sums[o.status] += o.qty
            want = {"stock": self.stock, "available": self.available, "pending": 0,
                    **{s: sums[s] for s in ("awaiting_payment", "paid", "shipped", "cancelled",
                                            "expired", "failed")}}
            assert led["consistent"] is True, led
            assert {f: led[f] for f in want} == want, (led, want)

    def teardown(self) -> None:
        if self.sale_id is None:
            return
        if sys.exc_info()[0] is not None:
            return  # a step failed: leave its state as it is, report that failure only
        self._rule = "teardown"
        self.run(self._final())

    async def _final(self) -> None:
        assert self.sale_id is not None
        await self._drain()
        api = self.shop.api  # both kinds of reader, on alternate examples
        reader: Reader = api if self.n % 2 else HttpReader(api.backends, api.base,
                                                           api.settings.admin_token)
        verdict = await self.history.check(reader, sales=[self.sale_id, self.other_sale_id])
        for name, value in verdict.figures().items():
            self.env.verdicts[name] += int(value)
        verdict.assert_valid()
        # every order the model knows: told to a client (ok), or a lost reply's (explained)
        known = verdict.accepted_orders + verdict.explained_by_unknown
        assert known == len(self.orders), verdict.figures()


# --------------------------------------------------------------------------- the test


async def _start(settings: Settings, stack: AsyncExitStack) -> tuple[Shop, TcpProxy]:
    shop = await stack.enter_async_context(running_shop(settings))
    port = int(shop.api.base.rsplit(":", 1)[1])
    proxy = await stack.enter_async_context(TcpProxy("127.0.0.1", port))
    return shop, proxy


def test_state_machine(chaos_settings: Settings, figures: Figures) -> None:
    settings = replace(
        chaos_settings, **{**FAST, "consumer_claim_idle_ms": CLAIM_IDLE_MS,
                           "gateway_webhook_attempts": 1},
    )
    loop = LoopThread()
    stack = AsyncExitStack()
    started = time.monotonic()
    failing = 1
    try:
        shop, proxy = loop.run(_start(settings, stack))
        env = Env(loop, shop, proxy, secrets.token_hex(3))
        machine = type("LedgerMachineRun", (LedgerMachine,), {"env": env})
        seed(SEED)(machine)
        if REPRODUCE:  # "<hypothesis version> <blob>" as a failing run printed it
            version, blob = REPRODUCE.split()
            reproduce_failure(version, blob.encode())(machine)
        run_state_machine_as_test(machine, settings=hsettings(
            max_examples=MAX_EXAMPLES, stateful_step_count=STEPS, deadline=None,
            database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ))
        failing = 0
    finally:
        loop.run(stack.aclose())
        loop.close()
        if "env" in locals():
            figures.update(
                seed=SEED, max_examples=MAX_EXAMPLES, stateful_step_count=STEPS,
                examples_run=env.examples, steps_run=env.steps, failing_examples=failing,
                reservations=env.reservations, rules=dict(sorted(env.rules.items())),
                webhooks=dict(sorted(env.outcomes.items())),
                history=dict(env.verdicts), wall_s=round(time.monotonic() - started, 1),
            )
            by_time = sorted(env.seconds.items(), key=lambda kv: -kv[1])
            seconds = {k: round(v, 1) for k, v in by_time}
            print(f"\nstate machine: {env.examples} examples, {env.steps} steps, "
                  f"{failing} failing example(s), webhooks {dict(env.outcomes)} "
                  f"({env.reservations} reservations), seed {SEED}; rules {dict(env.rules)}; "
                  f"history {dict(env.verdicts)}; seconds {seconds}")


def test_state_machine_lifecycle_walk(chaos_settings: Settings, figures: Figures) -> None:
    """One fixed program through the same machine and invariants, so that every rule and
    every order transition runs on every run, whatever the random examples reach."""
    settings = replace(
        chaos_settings, **{**FAST, "consumer_claim_idle_ms": CLAIM_IDLE_MS,
                           "gateway_webhook_attempts": 1},
    )
    loop = LoopThread()
    stack = AsyncExitStack()
    try:
        shop, proxy = loop.run(_start(settings, stack))
        env = Env(loop, shop, proxy, secrets.token_hex(3))
        m = type("LedgerMachineWalk", (LedgerMachine,), {"env": env})()

        def at(order_id: str, among: list[MOrder] | None = None) -> int:
            return [o.order_id for o in (among or list(m.orders.values()))].index(order_id)

        def check(step: Callable[[], None]) -> None:
            step()
            m.service_agrees_with_model()

        def newest() -> str:
            return str(list(m.orders)[-1])

        check(lambda: m.create_sale(stock=4, limit=2))
        check(lambda: m.reserve(user=0, qty=1, keyed=True))
        a = newest()
        check(lambda: m.reserve_reply_lost(user=1, qty=1, keyed=True, mode="reset", retry=True))
        b = newest()
        check(lambda: m.reserve_reply_lost(user=2, qty=1, keyed=False, mode="timeout",
                                           retry=False))
        c = newest()
        for variant in ("same", "other_quantity", "other_sale"):
            check(functools.partial(m.replay, i=0, variant=variant))
        check(lambda: m.reserve(user=0, qty=2, keyed=True))  # 409 limit_exceeded, remembered
        check(lambda: m.replay(i=len(m.keys) - 1, variant="same"))
        check(lambda: m.consumer(action="crash_after_commit", count=1))  # a: committed, unacked
        check(lambda: m.consumer(action="crash_before_commit", count=1))  # b: read, lost
        check(lambda: m.pay(i=at(c), live=False, then="succeeded"))  # c pending: queued
        check(lambda: m.consumer(action="restart", count=1))  # reclaims a, b; persists c
        assert all(m.orders[x].status == "awaiting_payment" for x in (a, b))
        assert m.orders[c].status == "paid"  # the inbox applied c's kept payment
        check(lambda: m.pay(i=at(a), live=False, then="succeeded"))  # a paid
        check(m.ship)
        check(lambda: m.pay(i=at(b), live=False, then="failed"))  # b payable again
        awaiting = [o for o in m.orders.values() if o.status == "awaiting_payment"]
        check(lambda: m.expire(i=at(b, awaiting), sweep=False))  # lapsed, unswept
        check(lambda: m.pay(i=at(b), live=False, then="nothing"))  # 409: the hold ran out
        paid_for = [o for o in m.orders.values() if o.payment]
        check(lambda: m.settle(i=at(b, paid_for), outcome="succeeded", via="signed",
                               live=False))  # refunded, b expired right there
        check(lambda: m.reserve(user=1, qty=1, keyed=False))
        e = newest()
        check(lambda: m.consumer(action="restart", count=1))
        awaiting = [o for o in m.orders.values() if o.status == "awaiting_payment"]
        check(lambda: m.expire(i=at(e, awaiting), sweep=False))
        check(lambda: m.expire(i=at(e, awaiting), sweep=True))  # drawn again: swept now
        check(lambda: m.restock(qty=2))
        check(lambda: m.reserve(user=2, qty=1, keyed=False))
        d = newest()
        check(lambda: m.pay(i=at(d), live=False, then="succeeded"))  # d pending: queued
        check(lambda: m.cancel(i=at(d)))  # cancelled while pending: kept payment refunded
        assert m.orders[d].payment is not None and m.orders[d].payment.status == "refunded"
        check(lambda: m.cancel(i=at(d)))  # 409 order_not_cancellable
        check(lambda: m.cancel(i=at(a)))  # shipped: 409
        check(lambda: m.consumer(action="restart", count=1))
        m.teardown()
        want = {"paid", "queued", "payment_failed", "refunded"}
        assert want <= {k.removeprefix("webhook_") for k in env.outcomes}, env.outcomes
        assert {m.orders[x].status for x in (a, b, c, d, e)} == {
            "shipped", "expired", "cancelled"}
        figures.update(steps=env.steps, rules=dict(sorted(env.rules.items())),
                       webhooks=dict(sorted(env.outcomes.items())),
                       history=dict(env.verdicts))
    finally:
        loop.run(stack.aclose())
        loop.close()


# --------------------------------------------------------------------------- the checker


def _op(op: int, user: str, key: str | None, qty: int, status: int | None,
        order_id: str | None = None, message: str = "") -> Operation:
    reply = Reply(status, order_id, None if status in (None, 202) else "x", message)
    o = Operation(OpId(op), ReserveRequest("s", user, qty, key), 0.0)
    o.reply, o.outcome = reply, classify(reply)
    return o


def _state(*rows: Row, released: dict[str, bool] | None = None,
           dead: frozenset[str] = frozenset()) -> SaleState:
    return SaleState("s", 10, 0, {r.order_id: r for r in rows}, released or {}, set(dead),
                     set(), 0, 0, {"consistent": True})


def test_history_checker_classifies_every_fate() -> None:
    """The checker itself: each fate from a hand-made history and final state."""
    ops = [
        _op(1, "a", "k1", 1, 202, "o1"),            # persisted
        _op(2, "a", "k1", 1, 202, "o1"),            # its replay: the same order, once
        _op(3, "b", "k2", 2, 202, "o2"),            # cancelled: compensated
        _op(4, "c", "k3", 1, 202, "o3"),            # no row anywhere: lost
        _op(5, "d", "k4", 1, 202, "o4"),            # dead-lettered: compensated
        _op(6, "e", "k5", 1, 202, "o5"),            # a second live order under k5: duplicated
        _op(7, "f", None, 1, None),                 # timed out, but it reserved: explained
        _op(8, "g", "k6", 1, 503, message="the outcome is unknown: retry"),
        _op(9, "h", "k7", 1, 503, message="nothing was reserved"),  # said so, but reserved
        _op(10, "i", "k8", 1, 409),
    ]
    assert [o.outcome for o in ops[6:]] == [
        Outcome.UNKNOWN, Outcome.UNKNOWN, Outcome.FAILED, Outcome.FAILED]
    state = _state(
        Row("o1", "a", "k1", 1, "awaiting_payment"),
        Row("o2", "b", "k2", 2, "cancelled"),
        Row("o5", "e", "k5", 1, "paid"),
        Row("o5b", "e", "k5", 1, "awaiting_payment"),
        Row("o6", "f", None, 1, "awaiting_payment"),
        Row("o7", "g", "k6", 1, "expired"),
        Row("o8", "h", "k7", 1, "awaiting_payment"),
        released={"o2": True, "o7": True}, dead=frozenset({"o4"}),
    )
    orders, violations = classify_sale(state, ops)
    fates = {o.order_id: o.fate for o in orders}
    assert fates == {
        "o1": Fate.PERSISTED, "o2": Fate.COMPENSATED, "o3": Fate.LOST, "o4": Fate.COMPENSATED,
        "o5": Fate.PERSISTED, "o5b": Fate.DUPLICATED, "o6": Fate.EXPLAINED,
        "o7": Fate.EXPLAINED, "o8": Fate.UNEXPECTED,
    }, fates
    assert violations == []
    # one order id answered to two different requests counts twice
    orders, _ = classify_sale(_state(Row("o1", "a", "k1", 1, "paid")), [
        _op(1, "a", "k1", 1, 202, "o1"), _op(2, "a", "k1", 2, 202, "o1")])
    assert [o.fate for o in orders] == [Fate.DUPLICATED]
