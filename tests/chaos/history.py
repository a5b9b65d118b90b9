"""A history checker for reservations under faults (a small Jepsen-style checker).

Record every reservation a test sends, then, once faults have healed and the
queues drained, read the final state and classify each accepted order::

    history = History()
    op = history.invoke(sale_id, "alice", quantity=1, key="k-1")
    ...                                   # send it (any client, any fault)
    history.complete(op, status, body)    # or history.fail(op, exc) without an answer
    verdict = await history.check(api)    # drains, reads PostgreSQL, Redis, the ledger
    verdict.assert_valid()                # lost == 0, duplicated == 0, ... (below)

``History.reserve(api, ...)`` does invoke + send + complete in one call.

**Operations.** Each is ``invoked`` when sent, then exactly one of:

* ``ok``: 202 with an ``order_id`` (stock reserved);
* ``failed``: a decided refusal (409, 422, 4xx) or a 503/429 that by the
  contract reserved nothing;
* ``unknown``: no answer (timeout, connection reset, the front killed), any
  other 5xx, or a 503 that says the outcome is unknown (a Redis timeout while
  the script may have run; see flashsale/core/resolve.py). An operation never
  completed counts as unknown too.

**Final read**, per sale the history touched: PostgreSQL ``orders``,
``releases`` and ``sales``; Redis holds, pending orders, stream and dead
letters; and the ledger through ``GET /api/v1/admin/sales/{id}/ledger``.

**Classification** of each accepted order (an ``order_id`` some ``ok``
operation returned):

* ``persisted``: one order row, holding stock (awaiting_payment, paid, shipped);
* ``compensated``: one order row released (cancelled, expired, failed) with its
  release row, or dead-lettered with its hold returned;
* ``lost``: no trace in PostgreSQL nor in the dead letters;
* ``duplicated``: the order stands for a request some other order also stands
  for: two non-failed orders under one (sale, buyer, Idempotency-Key), one key
  answered with two order ids, or one order id answered to two different
  requests (counted twice).

And each order row no ``ok`` operation returned is explained, if it can be,
by one ``unknown`` (or never completed) operation with the same sale, buyer,
quantity and key (each explains at most one row); otherwise it is
``unexpected``: a reservation nobody was told about, e.g. a 503 "nothing
reserved" that did reserve.

**Invariants** (``Verdict.violations``, all checked by ``check``): lost == 0;
duplicated == 0; unexpected == 0; per sale: accepted (held) quantity <= stock,
PostgreSQL ``sold`` == held quantity, the ledger ``consistent``, the stream
drained, Redis holds == the orders PostgreSQL says hold stock, and every
release has its row and is finished in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NewType, Protocol

import aiohttp

from flashsale.core import ledger
from flashsale.core.backends import Backends
from flashsale.core.clients import as_text
from flashsale.core.compensate import Compensator
from flashsale.ops.metrics import Metrics

OpId = NewType("OpId", int)

HOLDING = frozenset({"awaiting_payment", "paid", "shipped"})
RELEASED = frozenset({"cancelled", "expired", "failed"})
UNKNOWN_OUTCOME_MARK = "outcome is unknown"  # flashsale/core/outcomes.py, Redis timeout
LEDGER_RETRY_S = 20.0  # a front answering 503 while it finds Redis again (HttpReader.ledger)


class Outcome(StrEnum):
    INVOKED = "invoked"
    OK = "ok"
    FAILED = "failed"
    UNKNOWN = "unknown"


class Fate(StrEnum):
    PERSISTED = "persisted"
    COMPENSATED = "compensated"
    LOST = "lost"
    DUPLICATED = "duplicated"
    UNEXPECTED = "unexpected"
    EXPLAINED = "explained"  # a row an unknown operation accounts for


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """``POST /api/v1/sales/{sale_id}/orders`` as ``user_id`` with body {"quantity"}."""

    sale_id: str
    user_id: str
    quantity: int
    key: str | None  # the Idempotency-Key header, None when not sent


@dataclass(frozen=True, slots=True)
class Reply:
    """What came back: ``status`` None when nothing did (timeout, reset)."""

    status: int | None
    order_id: str | None = None
    code: str | None = None
    message: str | None = None


@dataclass(slots=True)
class Operation:
    op: OpId
    request: ReserveRequest
    invoked_at: float
    outcome: Outcome = Outcome.INVOKED
    reply: Reply | None = None
    completed_at: float | None = None

    @property
    def settled_unknown(self) -> bool:
        """Unknown or never completed: it may or may not have reserved."""
        return self.outcome in (Outcome.UNKNOWN, Outcome.INVOKED)


def classify(reply: Reply) -> Outcome:
    """The default classification of a reservation's reply (see the module docstring)."""
    if reply.status is None:
        return Outcome.UNKNOWN
    if reply.status == 202:
        return Outcome.OK if reply.order_id else Outcome.UNKNOWN
    if reply.status == 503:
        unknown = UNKNOWN_OUTCOME_MARK in (reply.message or "")
        return Outcome.UNKNOWN if unknown else Outcome.FAILED
    if reply.status >= 500:
        return Outcome.UNKNOWN
    return Outcome.FAILED


def reply_of(status: int | None, body: Any) -> Reply:
    """A Reply from an HTTP status and its parsed JSON body (anything else tolerated)."""
    if not isinstance(body, Mapping):
        return Reply(status)
    err = body.get("error")
    if isinstance(err, Mapping):
        return Reply(status, None, _str(err.get("code")), _str(err.get("message")))
    return Reply(status, _str(body.get("order_id")))


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


class Reader(Protocol):
    """What ``check`` reads through: tests.support.Api fits, and so does HttpReader."""

    @property
    def backends(self) -> Backends: ...

    async def ledger(self, sale_id: str) -> dict[str, Any]: ...


@dataclass
class HttpReader:
    """A Reader for a front that runs elsewhere (a child process): direct
    connections for PostgreSQL and Redis, the ledger over HTTP."""

    backends: Backends
    base: str
    admin_token: str

    async def ledger(self, sale_id: str) -> dict[str, Any]:
        """The ledger, as a client reads it: a 503 (the front still finding or
        verifying Redis, e.g. Sentinel answering no master for a moment after a
        failover) is retried after its Retry-After, for at most LEDGER_RETRY_S."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        url = f"{self.base}/api/v1/admin/sales/{sale_id}/ledger"
        deadline = time.monotonic() + LEDGER_RETRY_S
        async with aiohttp.ClientSession() as s:
            while True:
                async with s.get(url, headers=headers) as r:
                    body: dict[str, Any] = await r.json(content_type=None)
                    retry_s = float(r.headers.get("Retry-After", "1"))
                if r.status != 503 or time.monotonic() + retry_s > deadline:
                    assert r.status == 200, (r.status, body)
                    return body
                await asyncio.sleep(retry_s)


# --------------------------------------------------------------------------- verdict


@dataclass(frozen=True, slots=True)
class OrderVerdict:
    order_id: str
    sale_id: str
    fate: Fate
    status: str | None  # PostgreSQL's, None without a row
    ops: tuple[OpId, ...]  # the operations it answers (ok ones, or the unknown one)
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SaleVerdict:
    sale_id: str
    stock: int
    sold: int
    held: int  # sum of quantities of PostgreSQL orders holding stock
    accepted_qty: int  # sum of quantities of distinct accepted orders (ok operations)
    ledger: dict[str, Any]
    drained: bool
    holds_missing: tuple[str, ...]  # PostgreSQL holds it, Redis has no hold entry
    holds_extra: tuple[str, ...]  # Redis holds it, PostgreSQL does not
    releases_open: int  # release rows not finished in Redis
    released_without_row: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Verdict:
    operations: int
    ok: int
    failed: int
    unknown: int  # including never completed
    accepted_orders: int  # distinct order ids of ok operations
    persisted: int
    compensated: int
    lost: int
    duplicated: int
    unexpected: int
    explained_by_unknown: int  # rows an unknown operation accounts for
    sales: tuple[SaleVerdict, ...]
    orders: tuple[OrderVerdict, ...]
    violations: tuple[str, ...]

    @property
    def valid(self) -> bool:
        return not self.violations

    def figures(self) -> dict[str, Any]:
        return {
            "operations": self.operations, "ok": self.ok, "failed": self.failed,
            "unknown": self.unknown, "accepted_orders": self.accepted_orders,
            "persisted": self.persisted, "compensated": self.compensated, "lost": self.lost,
            "duplicated": self.duplicated, "unexpected": self.unexpected,
            "explained_by_unknown": self.explained_by_unknown,
            "oversold_sales": sum(1 for s in self.sales if s.held > s.stock),
            "inconsistent_ledgers": sum(1 for s in self.sales if not s.ledger.get("consistent")),
            "violations": len(self.violations),
        }

    def assert_valid(self) -> None:
        assert self.valid, "history check failed:\n  " + "\n  ".join(self.violations[:50])


# --------------------------------------------------------------------------- history


@dataclass
class History:
    """Reservations as invoked and completed; ``check`` classifies the outcome."""

    ops: dict[OpId, Operation] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def invoke(
        self, sale_id: str, user_id: str, quantity: int = 1, key: str | None = None
    ) -> OpId:
        """Record a reservation about to be sent; returns its id."""
        with self._lock:
            op = OpId(next(self._ids))
            self.ops[op] = Operation(op, ReserveRequest(sale_id, user_id, quantity, key),
                                     time.monotonic())
            return op

    def complete(self, op: OpId, status: int | None, body: Any = None) -> Outcome:
        """Record the reply (status and parsed JSON body); returns its classification."""
        return self.complete_reply(op, reply_of(status, body))

    def complete_reply(self, op: OpId, reply: Reply) -> Outcome:
        with self._lock:
            operation = self.ops[op]
            assert operation.outcome is Outcome.INVOKED, f"operation {op} completed twice"
            operation.reply = reply
            operation.outcome = classify(reply)
            operation.completed_at = time.monotonic()
            return operation.outcome

    def fail(self, op: OpId, error: BaseException | str) -> Outcome:
        """No answer came back (timeout, reset, killed front): the outcome is unknown."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        return self.complete_reply(op, Reply(None, message=text))

    async def reserve(
        self, api: Any, sale_id: str, user_id: str, quantity: int = 1, key: str | None = None,
        *, timeout_s: float = 10.0,
    ) -> tuple[Outcome, Reply]:
        """invoke, send through ``api`` (tests.support.Api), complete."""
        op = self.invoke(sale_id, user_id, quantity, key)
        headers = api.buyer(user_id)
        if key is not None:
            headers["Idempotency-Key"] = key
        try:
            status, body, _ = await asyncio.wait_for(
                api.request("POST", f"/api/v1/sales/{sale_id}/orders",
                            json={"quantity": quantity}, headers=headers),
                timeout_s,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return self.fail(op, exc), Reply(None, message=repr(exc))
        outcome = self.complete(op, status, body)
        reply = self.ops[op].reply
        assert reply is not None
        return outcome, reply

    @property
    def sale_ids(self) -> list[str]:
        return sorted({o.request.sale_id for o in self.ops.values()})

    def counts(self) -> Counter[Outcome]:
        return Counter(o.outcome for o in self.ops.values())

    # ------------------------------------------------------------------- check

    async def check(
        self, api: Reader, *, sales: Iterable[str] | None = None, drain: bool = True,
        settle_timeout_s: float = 60.0,
    ) -> Verdict:
        """Drain and settle (``drain``), read the final state, classify, check invariants."""
        sale_ids = sorted(set(sales) if sales is not None else set(self.sale_ids))
        violations: list[str] = []
        if drain:
            for sale_id in sale_ids:
                with contextlib.suppress(AssertionError):
                    await settle(api.backends, sale_id, settle_timeout_s)
        ops = list(self.ops.values())
        orders: list[OrderVerdict] = []
        sale_verdicts: list[SaleVerdict] = []
        for sale_id in sale_ids:
            state = await read_state(api, sale_id)
            sale_ops = [o for o in ops if o.request.sale_id == sale_id]
            found, sale_violations = classify_sale(state, sale_ops)
            orders += found
            violations += sale_violations
            sale_verdicts.append(state.verdict(found))
            violations += sale_invariants(sale_verdicts[-1])
        fates = Counter(o.fate for o in orders)
        for fate in (Fate.LOST, Fate.DUPLICATED, Fate.UNEXPECTED):
            for o in orders:
                if o.fate is fate:
                    violations.append(f"{fate}: order {o.order_id} ({o.status}) {o.detail}")
        counts = Counter(o.outcome for o in ops)
        accepted = {o.reply.order_id for o in ops if o.outcome is Outcome.OK and o.reply}
        return Verdict(
            operations=len(ops), ok=counts[Outcome.OK], failed=counts[Outcome.FAILED],
            unknown=counts[Outcome.UNKNOWN] + counts[Outcome.INVOKED],
            accepted_orders=len(accepted), persisted=fates[Fate.PERSISTED],
            compensated=fates[Fate.COMPENSATED], lost=fates[Fate.LOST],
            duplicated=fates[Fate.DUPLICATED], unexpected=fates[Fate.UNEXPECTED],
            explained_by_unknown=fates[Fate.EXPLAINED], sales=tuple(sale_verdicts),
            orders=tuple(orders), violations=tuple(violations),
        )


# --------------------------------------------------------------------------- final read


@dataclass(frozen=True, slots=True)
class Row:
    order_id: str
    user_id: str
    key: str | None
    quantity: int
    status: str


@dataclass
class SaleState:
    """Everything the classification reads for one sale, after the queues drained."""

    sale_id: str
    stock: int
    sold: int
    rows: dict[str, Row]
    releases: dict[str, bool]  # order id -> finished in Redis
    dead_lettered: set[str]
    redis_holds: set[str]
    stream_len: int
    pending: int
    ledger: dict[str, Any]

    def verdict(self, orders: list[OrderVerdict]) -> SaleVerdict:
        holding = {r.order_id for r in self.rows.values() if r.status in HOLDING}
        accepted = {o.order_id: o for o in orders if o.fate is not Fate.UNEXPECTED
                    and o.fate is not Fate.EXPLAINED}
        released = [r.order_id for r in self.rows.values()
                    if r.status in RELEASED and r.order_id not in self.releases]
        return SaleVerdict(
            sale_id=self.sale_id, stock=self.stock, sold=self.sold,
            held=sum(r.quantity for r in self.rows.values() if r.status in HOLDING),
            accepted_qty=sum(self.rows[o].quantity for o in accepted if o in self.rows),
            ledger=self.ledger, drained=self.stream_len == 0 and self.pending == 0,
            holds_missing=tuple(sorted(holding - self.redis_holds)),
            holds_extra=tuple(sorted(self.redis_holds - holding)),
            releases_open=sum(1 for done in self.releases.values() if not done),
            released_without_row=tuple(sorted(released)),
        )


async def read_state(api: Reader, sale_id: str) -> SaleState:
    b = api.backends
    k = b.keys(sale_id)
    sale = await b.pg.fetchrow("SELECT stock, sold FROM sales WHERE sale_id = $1", sale_id)
    assert sale is not None, f"sale {sale_id} is not in PostgreSQL"
    rows = await b.pg.fetch(
        "SELECT order_id, user_id, idempotency_key, quantity, status FROM orders "
        "WHERE sale_id = $1", sale_id,
    )
    releases = await b.pg.fetch(
        "SELECT order_id, redis_released_at IS NOT NULL AS done FROM releases "
        "WHERE sale_id = $1", sale_id,
    )
    dlq: Any = await b.redis.xrange(k.dlq)
    pending = await b.redis.hget(k.sale, "pending")
    return SaleState(
        sale_id=sale_id, stock=int(sale["stock"]), sold=int(sale["sold"]),
        rows={r["order_id"]: Row(r["order_id"], r["user_id"], r["idempotency_key"],
                                 int(r["quantity"]), r["status"]) for r in rows},
        releases={r["order_id"]: bool(r["done"]) for r in releases},
        dead_lettered={as_text(f.get(b"o", b"")) for _id, f in dlq} - {""},
        redis_holds={as_text(h) for h in await b.redis.hkeys(k.holds)},
        stream_len=int(await b.redis.xlen(k.stream)), pending=int(pending or 0),
        ledger=await api.ledger(sale_id),
    )


async def settle(b: Backends, sale_id: str, timeout_s: float = 60.0) -> None:
    """Wait until the sale's stream is drained (a consumer of our own helps), Redis
    holds what PostgreSQL persisted (the compensate role's rebuild sweep, run here
    once drained: a primary that took over without writes a stale one took and the
    consumer persisted is behind the watermark and rebuilt -- production's 5 s
    sweep, or the next new connection's check) and every release and restock is
    finished in Redis (the compensator's outbox sweeps)."""
    from flashsale.core.persist import Persister

    persister = Persister(b, Metrics(), name=f"history-check-{sale_id}")
    compensator = Compensator(b, Metrics(), name="history-check")
    k = b.keys(sale_id)
    deadline = time.monotonic() + timeout_s
    while True:
        await persister.step()
        if int(await b.redis.xlen(k.stream)) == 0:
            await ledger.rebuild_missing(b)
            open_releases = await b.pg.fetchval(
                "SELECT count(*) FROM releases WHERE sale_id = $1 AND redis_released_at IS NULL",
                sale_id,
            )
            open_restocks = await b.pg.fetchval(
                "SELECT count(*) FROM restocks WHERE sale_id = $1 AND applied_at IS NULL",
                sale_id,
            )
            if not open_releases and not open_restocks:
                return
            await compensator.sweep_outbox()
            await compensator.sweep_restocks()
        if time.monotonic() > deadline:
            raise AssertionError(f"sale {sale_id} not settled in {timeout_s}s")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- classification


def classify_sale(
    state: SaleState, ops: list[Operation]
) -> tuple[list[OrderVerdict], list[str]]:
    """Classify every accepted order and every order row of one sale."""
    violations: list[str] = []
    ok = [o for o in ops if o.outcome is Outcome.OK and o.reply and o.reply.order_id]
    by_order: dict[str, list[Operation]] = defaultdict(list)
    for o in ok:
        assert o.reply is not None and o.reply.order_id is not None
        by_order[o.reply.order_id].append(o)

    duplicated: dict[str, str] = {}
    # one order id answered to different requests: counted twice
    for order_id, answered in by_order.items():
        requests = {o.request for o in answered}
        if len(requests) > 1:
            duplicated[order_id] = f"answered to {len(requests)} different requests"
    # one (buyer, key) answered with two order ids, or holding two non-failed rows
    per_key: dict[tuple[str, str], set[str]] = defaultdict(set)
    for o in ok:
        if o.request.key is not None:
            assert o.reply is not None and o.reply.order_id is not None
            per_key[(o.request.user_id, o.request.key)].add(o.reply.order_id)
    for row in state.rows.values():
        if row.key is not None and row.status != "failed":
            per_key[(row.user_id, row.key)].add(row.order_id)
    for (user, key), order_ids in per_key.items():
        live = {oid for oid in order_ids
                if oid not in state.rows or state.rows[oid].status != "failed"}
        if len(live) > 1:
            for oid in sorted(live)[1:]:
                duplicated.setdefault(oid, f"second order under key {key!r} of {user}")

    orders: list[OrderVerdict] = []
    for order_id, answered in sorted(by_order.items()):
        ids = tuple(o.op for o in answered)
        found = state.rows.get(order_id)
        status = found.status if found else None
        if order_id in duplicated:
            fate, detail = Fate.DUPLICATED, duplicated[order_id]
        elif found is None:
            if order_id in state.dead_lettered:
                fate, detail = Fate.COMPENSATED, "dead-lettered, hold returned"
            else:
                fate, detail = Fate.LOST, "accepted (202) but not in PostgreSQL"
        elif found.status in HOLDING:
            fate, detail = Fate.PERSISTED, ""
            if order_id in state.releases:
                violations.append(f"order {order_id} holds stock but has a release row")
        elif found.status in RELEASED:
            fate, detail = Fate.COMPENSATED, found.status
        else:
            fate, detail = Fate.LOST, f"unknown status {found.status!r}"
        if found is not None and answered[0].request.quantity != found.quantity:
            violations.append(
                f"order {order_id}: requested {answered[0].request.quantity}, "
                f"PostgreSQL holds {found.quantity}"
            )
        orders.append(OrderVerdict(order_id, state.sale_id, fate, status, ids, detail))

    # rows no ok operation returned: explained by an unknown operation, or unexpected
    candidates = [o for o in ops if o.settled_unknown]
    # a 503 "nothing reserved" whose order was made and then released before the
    # answer (replication.py: the batch was not replicated in time) leaves a row
    # that holds nothing: status failed, with its release row
    voided = [o for o in ops if o.outcome is Outcome.FAILED and o.reply is not None
              and o.reply.status == 503]
    used: set[OpId] = set()
    for row in sorted(state.rows.values(), key=lambda r: r.order_id):
        if row.order_id in by_order:
            continue
        if row.order_id in duplicated:
            orders.append(OrderVerdict(row.order_id, state.sale_id, Fate.DUPLICATED, row.status,
                                       (), duplicated[row.order_id]))
            continue
        match = next(
            (o for o in candidates if o.op not in used and o.request.user_id == row.user_id
             and o.request.quantity == row.quantity and o.request.key == row.key), None,
        )
        if match is None and row.status == "failed" and row.order_id in state.releases:
            match = next(
                (o for o in voided if o.op not in used and o.request.user_id == row.user_id
                 and o.request.quantity == row.quantity and o.request.key == row.key), None,
            )
        if match is None:
            orders.append(OrderVerdict(
                row.order_id, state.sale_id, Fate.UNEXPECTED, row.status, (),
                "in PostgreSQL, but no ok or unknown operation can explain it",
            ))
            continue
        used.add(match.op)
        orders.append(OrderVerdict(row.order_id, state.sale_id, Fate.EXPLAINED, row.status,
                                   (match.op,), "an unknown operation's"))
    return orders, violations


def sale_invariants(s: SaleVerdict) -> list[str]:
    out = []
    if s.held > s.stock:
        out.append(f"sale {s.sale_id}: oversold, {s.held} held > stock {s.stock}")
    if s.sold != s.held:
        out.append(f"sale {s.sale_id}: PostgreSQL sold {s.sold} != held {s.held}")
    if not s.ledger.get("consistent"):
        out.append(f"sale {s.sale_id}: ledger inconsistent {s.ledger}")
    if not s.drained:
        out.append(f"sale {s.sale_id}: stream not drained")
    if s.holds_missing:
        out.append(f"sale {s.sale_id}: holding orders without a Redis hold {s.holds_missing[:5]}")
    if s.holds_extra:
        out.append(f"sale {s.sale_id}: Redis holds of orders not holding {s.holds_extra[:5]}")
    if s.releases_open:
        out.append(f"sale {s.sale_id}: {s.releases_open} release(s) not finished in Redis")
    if s.released_without_row:
        out.append(f"sale {s.sale_id}: released orders without a release row "
                   f"{s.released_without_row[:5]}")
    return out
