"""The waiting room's costs (issue 12), the `room` system of `make bench`:

- polls per second per front process (GET of a ticket: JWT, one room_poll
  script, the pass signed when admitted) against the echo ceiling (same HTTP
  stack, JWT and body parsing, no backend), both driven by the same closed-loop
  aiohttp client with the same concurrency;
- joins per second (POST .../queue: room_join then room_poll);
- Redis bytes per waiting ticket (MEMORY USAGE of the room's four per-ticket
  keys divided by the tickets).

Writes room.json and room.md next to the bench's other results, and latest.md's
"Waiting room" section (``python -m bench.room`` adds that section from the
room.json already there, without measuring). The Python
client shares the machine's cores with the servers: the ratio is the figure
to read, more than the absolute rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.lab import Lab
from bench.targets import EchoTarget, FlashsaleTarget
from flashsale.core.keys import SaleKeys

CONCURRENCY = 64


async def _closed_loop(
    lab: Lab, n: int, duration_s: float, request: Any
) -> tuple[float, dict[int, int]]:
    """``n`` clients, each sending ``request(i)`` again as soon as answered."""
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + duration_s

    async def client(i: int) -> None:
        while time.monotonic() < deadline:
            status = await request(i)
            statuses[status] = statuses.get(status, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(n)))
    elapsed = time.monotonic() - started
    return sum(statuses.values()) / elapsed, statuses


async def _status(lab: Lab, method: str, url: str, token: str, body: Any = None) -> int:
    async with lab.http.request(method, url, json=body,
                                headers={"Authorization": f"Bearer {token}"}) as r:
        await r.read()
        return r.status


async def measure_room(lab: Lab) -> dict[str, Any]:
    opts = lab.opts
    n = min(CONCURRENCY, len(lab.tokens))
    duration = max(1.0, opts.duration_s)
    echo = EchoTarget(lab, "room_echo", "echo ceiling (1 worker)", 1)
    await echo.start()
    try:
        echo_url = echo.orders_url("sl_benchroom0001")
        echo_rate, _ = await _closed_loop(
            lab, n, duration, lambda i: _status(lab, "POST", echo_url, lab.tokens[i], {}))
    finally:
        await echo.stop()
    front = FlashsaleTarget(lab, "room_w1", "flashsale waiting room (1 worker)", 1)
    await front.start()
    try:
        sale = await front._admin("POST", "/api/v1/sales", {
            "sku": "BENCH-ROOM", "name": "bench room", "price_cents": 1999, "stock": 1000,
            "waiting_room": {"admit_per_s": 1, "pass_seconds": 3600}})
        sid = sale["sale_id"]
        base = f"http://127.0.0.1:{front.port}/api/v1/sales/{sid}/queue"
        tickets: dict[int, str] = {}
        joiners = len(lab.tokens)

        async def join(i: int) -> None:
            async with lab.http.post(
                base, headers={"Authorization": f"Bearer {lab.tokens[i]}"}
            ) as r:
                body = await r.json()
                if r.status in (200, 201):
                    tickets[i] = body["ticket_id"]

        started = time.monotonic()
        sem = asyncio.Semaphore(n)

        async def bounded(i: int) -> None:
            async with sem:
                await join(i)

        await asyncio.gather(*(bounded(i) for i in range(joiners)))
        joins_per_s = len(tickets) / (time.monotonic() - started)
        # each client goes round every ticket (a buyer polls at poll_after_ms, far
        # under the per-buyer rate limit; one client hammering one ticket would not)
        owned = sorted(tickets)
        turn = [0] * n

        def poll(j: int) -> Any:
            turn[j] += 1
            i = owned[(j + n * turn[j]) % len(owned)]
            return _status(lab, "GET", f"{base}/{tickets[i]}", lab.tokens[i])

        poll_rate, statuses = await _closed_loop(lab, n, duration, poll)
        k = SaleKeys(lab.prefix, sid)
        used = 0
        for key in (k.room_queue, k.room_tickets, k.room_buyers, k.room_beats):
            used += int(await lab.redis.memory_usage(key, samples=0) or 0)
        per_ticket = used / max(1, len(tickets))
    finally:
        await front.stop()
    result = {
        "concurrency": n, "duration_s": duration, "tickets": len(tickets),
        "echo_per_s": round(echo_rate, 1), "polls_per_s": round(poll_rate, 1),
        "polls_vs_echo": round(poll_rate / echo_rate, 3) if echo_rate else None,
        "poll_statuses": {str(s): c for s, c in sorted(statuses.items())},
        "joins_per_s": round(joins_per_s, 1), "redis_bytes_per_ticket": round(per_ticket, 1),
        "client": "closed-loop aiohttp (Python), same for echo and flashsale",
    }
    return result


def _table(result: dict[str, Any]) -> str:
    """The figures' table: room.md's body and latest.md's section alike."""
    return (
        "| figure | value |\n| --- | --- |\n"
        f"| polls/s (GET ticket) | {result['polls_per_s']:,} |\n"
        f"| echo ceiling, same client | {result['echo_per_s']:,} |\n"
        f"| polls vs echo | {result['polls_vs_echo']} |\n"
        f"| joins/s (POST queue) | {result['joins_per_s']:,} |\n"
        f"| Redis bytes per waiting ticket | {result['redis_bytes_per_ticket']} |\n"
        f"| tickets, concurrency, seconds | {result['tickets']:,}, {result['concurrency']}, "
        f"{result['duration_s']:g} |\n\n{result['client']}.\n"
    )


def write(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    js = out_dir / "room.json"
    js.write_text(json.dumps(result, indent=2) + "\n")
    md = out_dir / "room.md"
    md.write_text("# Waiting room costs (1 front process)\n\n" + _table(result))
    return md, js


SECTION = "\n## Waiting room"


def add_section(latest_md: Path, room_json: Path) -> None:
    """latest.md's "Waiting room" section, from room.json's figures (run.py adds
    it after a run that measured the room; ``python -m bench.room`` adds it to
    the results as they are, without measuring anything). A section already
    there is replaced, so adding it twice leaves one."""
    text = latest_md.read_text()
    at = text.find(SECTION)
    if at >= 0:  # up to the next section, or the end
        end = text.find("\n## ", at + len(SECTION))
        text = text[:at] + (text[end:] if end >= 0 else "\n")
    result = json.loads(room_json.read_text())
    latest_md.write_text(
        text.rstrip("\n") + "\n" + SECTION + " (bench/room.py; 1 front process, a sale "
        "with a room, 1 admission a second so every ticket keeps waiting)\n\n"
        + _table(result)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.room",
        description="Add room.json's figures to latest.md (nothing is measured).")
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results",
                   help="the directory with latest.md and room.json")
    opts = p.parse_args(argv)
    room_json = opts.results / "room.json"
    if not room_json.is_file():
        print(f"no {room_json}: run the bench with the room system first", file=sys.stderr)
        return 1
    add_section(opts.results / "latest.md", room_json)
    print(f"added the waiting room's figures ({room_json}) to {opts.results / 'latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
