"""Test support shared by the Sentinel and the Cluster replica tests
(tests/integration/test_sentinel.py, test_cluster.py): a reservation retried
with its key until decided, and "a replica that is gone" as one round:

a sale of ``STOCK`` (one per buyer) takes one reservation; the replica is
broken (``fault``); ``ATTEMPTS`` buyers reserve, spaced so that they span the
lag after which a primary without its replica refuses writes
(min-replicas-to-write); the replica comes back (``restore``); the queues are
drained and compensated; the same buyers retry with the same keys.
``ReplicaGone.assert_nothing_reserved`` then holds: every attempt answered 503
"nothing reserved" within the ack timeout, nothing held, ledger consistent,
and the retries decided afresh.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tests.chaos.history import History, Outcome
from tests.support import Api

STOCK = 5
ATTEMPTS = 8
ATTEMPT_GAP_S = 0.4
Answer = tuple[int | None, str | None, float]  # status, message, seconds


async def reserve_until_decided(
    api: Api, history: History, sale_id: str, user: str, key: str, timeout_s: float = 30.0
) -> tuple[Outcome, float]:
    """Retry with the same key until a decided answer: (outcome, seconds)."""
    started = time.monotonic()
    while True:
        outcome, reply = await history.reserve(api, sale_id, user, 1, key)
        if outcome is Outcome.OK or (outcome is Outcome.FAILED and reply.status not in (429, 503)):
            return outcome, time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"{key} undecided: {reply}"
        await asyncio.sleep(0.1)


@dataclass
class ReplicaGone:
    answered: list[Answer]  # the attempts while the replica was gone
    sale: dict[str, Any]  # after the replica returned and the queues drained
    ledger: dict[str, Any]
    resumed: list[Outcome]  # the same buyers' retries, in order

    @property
    def released(self) -> int:
        """Attempts whose batch ran, fell short of acknowledgements and was released."""
        return sum(1 for _s, m, _t in self.answered if "nothing was reserved" in (m or ""))

    def assert_nothing_reserved(self, ack_timeout_ms: int) -> None:
        answered = self.answered
        assert [s for s, _m, _t in answered] == [503] * len(answered), answered
        assert all("nothing was reserved" in (m or "") or "NOREPLICAS" in (m or "")
                   for _s, m, _t in answered), answered
        assert max(t for _s, _m, t in answered) < ack_timeout_ms / 1000 + 1.0, answered
        # nothing held by the refused ones (a release Redis refused while it had no
        # replica -- NOREPLICAS -- is committed in PostgreSQL and finished by the outbox)
        assert self.sale["available"] == STOCK - 1, self.sale
        assert self.ledger["consistent"] is True, self.ledger
        assert self.resumed == [Outcome.OK] * (STOCK - 1) + [Outcome.FAILED]


async def replica_gone(
    api: Api, history: History, sale_id: str, *,
    fault: Callable[[], None], restore: Callable[[], None],
    during: Callable[[], Awaitable[None]] | None = None,
) -> ReplicaGone:
    """The round above on ``sale_id`` (created with ``STOCK``, per_user_limit 1);
    ``during`` runs after the attempts, before the replica returns."""
    outcome, _ = await reserve_until_decided(api, history, sale_id, "early", "early")
    assert outcome is Outcome.OK
    fault()
    answered: list[Answer] = []
    for i in range(ATTEMPTS):
        started = time.monotonic()
        _outcome, reply = await history.reserve(api, sale_id, f"gone-{i}", 1, f"gone-{i}")
        answered.append((reply.status, reply.message, time.monotonic() - started))
        await asyncio.sleep(ATTEMPT_GAP_S)
    if during is not None:
        await during()
    await asyncio.to_thread(restore)
    await api.drain(sale_id)  # voided orders are acked as failed: pending falls back
    await api.compensate()  # the outbox: releases Redis refused while it had no replica
    sale = (await api.request("GET", f"/api/v1/sales/{sale_id}"))[1]
    ledger = await api.ledger(sale_id)
    resumed = [(await reserve_until_decided(api, history, sale_id, f"gone-{i}", f"gone-{i}"))[0]
               for i in range(STOCK)]
    return ReplicaGone(answered, sale, ledger, resumed)
