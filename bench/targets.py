"""The systems under test: echo ceiling, naive PostgreSQL, flashsale's real service.

Each target starts its processes, makes sales, and checks a sale after a run
against its own state (the correctness printed beside the speed).
"""

from __future__ import annotations

import asyncio
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import Any

from bench import naive_pg_server, procs
from bench.lab import Lab
from flashsale.core.keys import SaleKeys
from flashsale.run.embedded.servers import free_port

DRAIN_TIMEOUT_S = 300.0
_ALPHABET = string.ascii_lowercase + string.digits


def random_sale_id() -> str:
    return "sl_" + "".join(secrets.choice(_ALPHABET) for _ in range(12))


@dataclass
class Check:
    """One sale after a run, as the system under test records it."""

    stock: int | None
    client_202: int
    accepted: int | None = None  # the system's own count of stock taken
    persisted: int | None = None  # order rows in PostgreSQL
    consistent: bool | None = None  # flashsale's ledger
    oversell: int = 0
    lost: int = 0
    ok: bool = True
    note: str = ""

    def summary(self) -> str:
        if self.stock is None:
            return f"no state ({self.note})" if self.note else "no state"
        parts = [f"202s {self.client_202:,}/stock {self.stock:,}"]
        if self.accepted is not None:
            parts.append(f"taken {self.accepted:,}")
        if self.persisted is not None:
            parts.append(f"rows {self.persisted:,}")
        if self.consistent is not None:
            parts.append("ledger consistent" if self.consistent else "LEDGER INCONSISTENT")
        parts.append(f"oversell {self.oversell} lost {self.lost}")
        if self.note:
            parts.append(self.note)
        return ("ok: " if self.ok else "FAILED: ") + ", ".join(parts)


def _unseen_note(taken: int, client_202: int) -> str:
    if taken > client_202:
        return f"{taken - client_202} accepted after the load generator stopped reading"
    return ""


@dataclass
class Target:
    lab: Lab
    key: str
    label: str
    workers: int = 1
    port: int = 0
    children: list[procs.Child] = field(default_factory=list)

    def orders_url(self, sale_id: str) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/sales/{sale_id}/orders"

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        for child in reversed(self.children):
            await asyncio.to_thread(child.stop)
        self.children.clear()

    def cpu_groups(self) -> dict[str, list[int]]:
        return {"front": [c.pid for c in self.children]}

    def worker_pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def has_stock(self) -> bool:
        return False

    async def new_sale(self, stock: int) -> str:
        return random_sale_id()

    async def available(self, sale_id: str) -> int | None:
        return None

    async def settle(self) -> None:
        """Wait for background work (a queue draining) before a measured run."""

    async def check(self, sale_id: str, stock: int | None, client_202: int) -> Check:
        return Check(stock=None, client_202=client_202, note="echo: nothing is reserved")

    def rss_mb(self) -> float | None:
        sizes = [procs.rss_bytes(p) for p in self.worker_pids()]
        return round(max(sizes) / 2**20, 1) if sizes else None


class EchoTarget(Target):
    async def start(self) -> None:
        self.port = free_port()
        env = self.lab.child_env()
        for i in range(self.workers):
            argv = procs.python_module("bench.echo_server", "--port", str(self.port))
            self.children.append(procs.start(f"{self.key}-{i}", argv, env, self.lab.logs))
        for child in self.children:
            await procs.wait_http(child, f"http://127.0.0.1:{self.port}/healthz")


class NaivePgTarget(Target):
    async def start(self) -> None:
        await naive_pg_server.setup_schema(self.lab.dsn)
        self.port = free_port()
        argv = procs.python_module(
            "bench.naive_pg_server", "--port", str(self.port), "--dsn", self.lab.dsn,
            "--pool", str(self.lab.opts.pg_pool),
        )
        self.children.append(procs.start(self.key, argv, self.lab.child_env(), self.lab.logs))
        await procs.wait_http(self.children[0], f"http://127.0.0.1:{self.port}/healthz")

    def has_stock(self) -> bool:
        return True

    async def new_sale(self, stock: int) -> str:
        sale_id = random_sale_id()
        await naive_pg_server.create_sale(self.lab.dsn, sale_id, stock)
        return sale_id

    async def available(self, sale_id: str) -> int | None:
        return (await naive_pg_server.sale_figures(self.lab.dsn, sale_id))["available"]

    async def check(self, sale_id: str, stock: int | None, client_202: int) -> Check:
        f = await naive_pg_server.sale_figures(self.lab.dsn, sale_id)
        taken = f["stock"] - f["available"]
        oversell = max(0, client_202 - f["stock"], taken - f["stock"], -f["available"])
        lost = max(0, taken - f["ordered"], client_202 - f["ordered"])
        sold_out = stock == 0 or f["available"] == 0
        ok = oversell == 0 and lost == 0 and taken == f["ordered"] and sold_out
        note = _unseen_note(taken, client_202) if sold_out else "NOT SOLD OUT"
        return Check(
            stock=f["stock"], client_202=client_202, accepted=taken, persisted=f["ordered"],
            oversell=oversell, lost=lost, ok=ok, note=note,
        )


class FlashsaleTarget(Target):
    """``flashsale serve --workers N`` plus one ``flashsale consume`` and one
    ``flashsale compensate`` process (the whole service, as ``flashsale up`` runs it)."""

    consumer: procs.Child | None = None
    compensator: procs.Child | None = None
    sales: list[str]

    def service_env(self) -> dict[str, str]:
        """The environment of the service's processes (a subclass adds to it)."""
        return self.lab.child_env(FLASHSALE_PORT=str(self.port))

    async def start(self) -> None:
        self.sales = []
        self.port = free_port()
        env = self.service_env()
        self.consumer = procs.start(
            f"{self.key}-consumer", procs.python_module("flashsale", "consume"), env,
            self.lab.logs,
        )
        front = procs.start(
            f"{self.key}-front",
            procs.python_module("flashsale", "serve", "--workers", str(self.workers)),
            env, self.lab.logs,
        )
        self.compensator = procs.start(
            f"{self.key}-compensator", procs.python_module("flashsale", "compensate"), env,
            self.lab.logs,
        )
        self.children = [self.consumer, front, self.compensator]
        await self._wait_ready(front)

    async def _wait_ready(self, front: procs.Child) -> None:
        url = f"http://127.0.0.1:{self.port}/readyz"
        await procs.wait_http(front, url, timeout_s=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(self.worker_pids()) >= self.workers:
                break
            await asyncio.sleep(0.1)
        # every worker must answer: new connections land on any of them
        for _ in range(10 * self.workers):
            await procs.wait_http(front, url, timeout_s=60)

    @property
    def front(self) -> procs.Child:
        return self.children[1]

    def cpu_groups(self) -> dict[str, list[int]]:
        assert self.consumer is not None and self.compensator is not None
        return {"front": [self.front.pid], "consumer": [self.consumer.pid],
                "compensator": [self.compensator.pid]}

    def worker_pids(self) -> list[int]:
        if self.workers == 1:
            return [self.front.pid]
        return procs.children_of(self.front.pid)

    async def _admin(self, method: str, path: str, body: Any = None) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        async with self.lab.http.request(
            method, url, json=body, headers=self.lab.admin_headers
        ) as resp:
            data = await resp.json()
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: HTTP {resp.status} {data}")
            return data

    def has_stock(self) -> bool:
        return True

    async def new_sale(self, stock: int) -> str:
        body = {"sku": "BENCH-1", "name": "bench hot sale", "price_cents": 1999, "stock": stock,
                "per_user_limit": 1, "hold_seconds": 3600}
        sale = await self._admin("POST", "/api/v1/sales", body)
        self.sales.append(sale["sale_id"])
        return str(sale["sale_id"])

    async def available(self, sale_id: str) -> int | None:
        return int((await self._admin("GET", f"/api/v1/sales/{sale_id}"))["available"])

    async def wait_drained(self, sale_id: str) -> None:
        stream = SaleKeys(self.lab.prefix, sale_id).stream
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while await self.lab.redis.xlen(stream):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stream of {sale_id} did not drain in {DRAIN_TIMEOUT_S}s")
            if self.consumer is not None and not self.consumer.alive():
                raise RuntimeError(f"the consumer died:\n{self.consumer.tail()}")
            await asyncio.sleep(0.05)

    async def settle(self) -> None:
        for sale_id in self.sales:
            await self.wait_drained(sale_id)

    async def check(self, sale_id: str, stock: int | None, client_202: int,
                    sold_out: bool = True) -> Check:
        """``sold_out``: the sale must have sold out (the closed-loop runs size it so);
        the open-loop levels leave stock over on purpose."""
        await self.wait_drained(sale_id)
        led = await self._admin("GET", f"/api/v1/admin/sales/{sale_id}/ledger")
        holding = led["awaiting_payment"] + led["paid"] + led["shipped"]
        released = led["cancelled"] + led["expired"] + led["failed"]
        persisted = holding + released
        taken = led["stock"] - led["available"] + released
        oversell = max(0, client_202 - led["stock"] - released, holding - led["stock"],
                       -led["available"])
        lost = max(0, taken - persisted, client_202 - persisted)
        sold_out = stock == 0 or led["available"] == 0 or not sold_out
        ok = bool(led["consistent"]) and oversell == 0 and lost == 0 and sold_out
        note = _unseen_note(taken, client_202) if sold_out else "NOT SOLD OUT"
        if released:
            note = f"{note}; {released} released (failed/expired)".strip("; ")
        return Check(
            stock=led["stock"], client_202=client_202, accepted=taken, persisted=persisted,
            consistent=bool(led["consistent"]), oversell=oversell, lost=lost, ok=ok, note=note,
        )
