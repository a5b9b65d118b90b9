"""At most one rebuild of a sale's Redis state at a time, per process."""

from __future__ import annotations

import asyncio
import logging

from flashsale import ledger
from flashsale.backends import Backends

log = logging.getLogger("flashsale.rebuilds")


class Rebuilds:
    def __init__(self, backends: Backends) -> None:
        self._b = backends
        self._tasks: dict[str, asyncio.Task[bool]] = {}

    def trigger(self, sale_id: str) -> None:
        if sale_id in self._tasks:
            return
        task = asyncio.create_task(self._run(sale_id))
        self._tasks[sale_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(sale_id, None))

    async def _run(self, sale_id: str) -> bool:
        try:
            return await ledger.rebuild(self._b, sale_id)
        except Exception:
            log.exception("rebuild of %s failed; the compensator retries", sale_id)
            return False

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
