"""The background loops of each worker role: one list, used by the app factory
(``flashsale up``, tests) and by ``flashsale consume`` / ``compensate``.

- consumer: the stream consumers of the group (persist).
- compensator: expiry, releases, the outbox, the payment inbox
  (:class:`Compensator`), the Redis rebuild sweep, the fulfilment saga and the
  domain-event notifier, and the waiting rooms' admitter (flashsale/room/).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from flashsale.commerce.integrations import Integrations
from flashsale.commerce.saga import SagaRunner
from flashsale.core import ledger, live_sales
from flashsale.core.compensate import Compensator
from flashsale.core.events import Notifier
from flashsale.core.persist import run_consumers
from flashsale.ops.metrics import Metrics
from flashsale.room.admitter import Admitter

if TYPE_CHECKING:
    from flashsale.core.backends import Backends

log = logging.getLogger(__name__)

REBUILD_INTERVAL_S = 5.0

Loop = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


async def periodic_rebuild(b: Backends, stop: asyncio.Event) -> None:
    """Detect live sales whose Redis state is gone, or lost writes PostgreSQL
    has (stream behind the persisted watermark), and rebuild them, at start and
    on a schedule; then take the drained ones out of the live index."""
    while not stop.is_set():
        try:
            rebuilt = await ledger.rebuild_missing(b)
            if rebuilt:
                log.warning("rebuilt %d sale(s) missing in Redis or behind PostgreSQL",
                            len(rebuilt))
            drained = await live_sales.drain(b)
            if drained:
                log.info("%d sale(s) drained: %s", len(drained), ", ".join(drained))
        except Exception as exc:
            log.warning("rebuild sweep failed: %r", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), REBUILD_INTERVAL_S)


def loops(
    b: Backends, m: Metrics, *, consumer: bool, compensator: bool, saga: bool,
    integrations: Integrations | None,
) -> list[Loop]:
    """The loops of the roles asked for; the saga (and the notifier) run with
    the compensator or alone, and need the integrations (gateway, carrier)."""
    out: list[Loop] = []
    if consumer:
        out.append(lambda ev: run_consumers(b, m, ev))
    if compensator:
        out.append(Compensator(b, m).run)
        out.append(lambda ev: periodic_rebuild(b, ev))
        out.append(Admitter(b).run)  # the waiting rooms' one admission loop
    if saga or compensator:
        if integrations is None:
            raise ValueError("the saga needs the integrations (gateway, carrier)")
        out.append(SagaRunner(b, integrations).run)
        out.append(Notifier(b).run)
    return out
