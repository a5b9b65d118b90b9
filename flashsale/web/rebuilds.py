"""At most one rebuild of a sale's Redis state at a time, per process, and at
most one verification of a Redis server this process has not verified."""

from __future__ import annotations

import asyncio
import logging

from flashsale.core import ledger
from flashsale.core.backends import Backends, unguarded

log = logging.getLogger("flashsale.rebuilds")

VERIFY_RETRY_S = 0.5  # a failed verification is retried no sooner (on the next connection)


class Rebuilds:
    """Rebuilds of sales missing in Redis (the first reservation that finds one
    triggers it), and the verification of a Redis server that the backends'
    RestartGuard has not seen verified: at start, and whenever a new
    connection meets another server (a restart). Until it is verified every
    command of this process fails (no reservation runs on a Redis that may
    have lost writes PostgreSQL has); the verification rebuilds the sales
    whose streams are behind their persisted watermark, then lets the guard
    pass connections to that server."""

    def __init__(self, backends: Backends) -> None:
        self._b = backends
        self._tasks: dict[str, asyncio.Task[bool]] = {}
        self._verifying: asyncio.Task[bool] | None = None
        self._failed_at = -VERIFY_RETRY_S
        if backends.guard is not None:
            backends.guard.on_unverified = self.verify_soon

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

    def verify_soon(self) -> None:
        """Start verifying the Redis server unless a verification is under way
        (or failed a moment ago: the next new connection asks again)."""
        loop = asyncio.get_running_loop()
        if self._verifying is not None and not self._verifying.done():
            return
        if loop.time() - self._failed_at < VERIFY_RETRY_S:
            return
        self._verifying = asyncio.create_task(self._verify())

    async def verify(self) -> bool:
        """Verify the Redis server now (at start); True when it is verified."""
        if self._verifying is None or self._verifying.done():
            self._verifying = asyncio.create_task(self._verify())
        return await asyncio.shield(self._verifying)

    async def _verify(self) -> bool:
        guard = self._b.guard
        if guard is None:
            return True
        try:
            async with unguarded(self._b) as b:
                run_id = await ledger.verify_server(b)
        except Exception as exc:
            self._failed_at = asyncio.get_running_loop().time()
            log.warning("could not verify Redis against PostgreSQL (%r); commands wait", exc)
            return False
        guard.verified(run_id)
        log.info("Redis %s verified against PostgreSQL", run_id)
        return True

    async def close(self) -> None:
        tasks: list[asyncio.Task[bool]] = list(self._tasks.values())
        if self._verifying is not None:
            tasks.append(self._verifying)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
