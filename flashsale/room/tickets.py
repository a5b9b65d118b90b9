"""Tickets of the waiting room: join, poll (the heartbeat), the admin's view
and controls. Every decision is one script (lua/room_*.lua); this module packs
their arguments and shapes their answers into the contract's bodies."""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Callable
from typing import Any

import msgspec
import orjson
from redis.exceptions import RedisError

from flashsale import errors, validate
from flashsale.core.backends import Backends
from flashsale.room import keys as rk
from flashsale.room import passes
from flashsale.room.eta import RoomNow, eta_range
from flashsale.room.results import JOIN_ERRORS, Configured, JoinCode, Joined, PollCode, Polled
from flashsale.room.settings import RoomSettings
from flashsale.schemas.bodies import WaitingRoomPatch

log = logging.getLogger("flashsale.room")

JOIN_GRACE_MS = 30_000  # a new ticket's first heartbeat deadline (its first poll follows)


LOTTERY_DRAW_BITS = 53  # room_join-6.lua scores a draw / 2^53: exact in a double
Draws = Callable[[], int]  # one lottery draw per call, uniform in [0, 2^53)


def lottery_draws(seed: int | None) -> Draws:
    """The lottery's source of draws: the OS's CSPRNG (seed None, always in
    service), or a PRNG seeded with ``seed`` whose draws repeat from run to run
    (Settings.room_lottery_seed, set by tests only)."""
    if seed is None:
        return lambda: secrets.randbits(LOTTERY_DRAW_BITS)
    rng = random.Random(seed)
    return lambda: rng.getrandbits(LOTTERY_DRAW_BITS)


def new_ticket_id() -> str:
    return "tk_" + secrets.token_hex(10)


async def join(
    b: Backends, sale_id: str, user_id: str, draws: Draws
) -> tuple[dict[str, Any], bool]:
    """The buyer's ticket (created: True) or the one it has (False); a ticket
    taken before the start gets its lottery place from one of ``draws``."""
    validate.sale_id(sale_id)
    k = b.keys(sale_id)
    now_ms = int(time.time() * 1000)
    raw = await b.scripts.room_join(
        keys=rk.join_keys(k),
        args=[now_ms, user_id, new_ticket_id(), draws(),
              b.settings.room_tickets_max, JOIN_GRACE_MS],
    )
    joined = Joined.of(raw)
    if joined.code is JoinCode.OVERLOADED:
        raise errors.Overloaded("the waiting room is full; retry later")
    if joined.code in JOIN_ERRORS:
        raise JOIN_ERRORS[joined.code]()
    return await poll(b, sale_id, joined.ticket_id, user_id), joined.code is JoinCode.CREATED


async def poll(b: Backends, sale_id: str, ticket_id: str, user_id: str) -> dict[str, Any]:
    """The ticket as the contract shows it; for a waiting ticket, its heartbeat."""
    validate.sale_id(sale_id)
    if not passes.TICKET_ID_RE.fullmatch(ticket_id):
        raise errors.TicketNotFound()
    k = b.keys(sale_id)
    now_ms = int(time.time() * 1000)
    raw = await b.scripts.room_poll(keys=rk.poll_keys(k), args=[now_ms, ticket_id, user_id])
    got = Polled.of(raw)
    if got is PollCode.SALE_NOT_FOUND:
        raise errors.SaleNotFound()
    if isinstance(got, PollCode):
        raise errors.TicketNotFound()
    eta = None
    if got.state == "waiting":
        bounds = eta_range(got.room, got.position, now_ms)
        eta = None if bounds is None else {"low": bounds[0], "high": bounds[1]}
    admitted = got.state == "admitted"
    return {
        "ticket_id": ticket_id,
        "sale_id": sale_id,
        "state": got.state,
        "position": got.position if got.state == "waiting" else None,
        "eta_seconds": eta,
        "poll_after_ms": got.poll_after_ms,
        "pass": passes.sign(
            b.settings.pass_secret, sale_id, user_id, ticket_id, got.pass_expires_ms
        ) if admitted else None,
        "pass_expires_at": validate.iso_ms(got.pass_expires_ms) if admitted else None,
    }


async def _room_of(b: Backends, sale_id: str) -> RoomSettings:
    validate.sale_id(sale_id)
    row = await b.pg.fetchrow("SELECT waiting_room FROM sales WHERE sale_id = $1", sale_id)
    if row is None:
        raise errors.SaleNotFound()
    room = RoomSettings.from_row(row["waiting_room"])
    if room is None:
        raise errors.WaitingRoomOff()
    return room


async def figures_many(b: Backends, sale_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Per sale (each with a room): the admin body's figures plus the ETA of the
    last place and whether the room is closed. One Redis pipeline."""
    out: dict[str, dict[str, Any]] = {}
    if not sale_ids:
        return out
    async with b.redis.pipeline(transaction=False) as pipe:
        for sid in sale_ids:
            k = b.keys(sid)
            pipe.zcard(k.room_queue)
            pipe.zcard(k.room_admitted)
            pipe.hlen(k.room_used)
            pipe.hmget(k.room, "admitted_total", "expired", "measured", "closed")
            pipe.hmget(k.sale, "room_rate", "room_paused", "available", "room_oversub",
                       "starts_ms")
        got = await pipe.execute()
    now_ms = int(time.time() * 1000)
    for n, sid in enumerate(sale_ids):
        waiting, outstanding, used, room, sale = got[5 * n: 5 * n + 5]
        r = RoomNow(
            rate=float(sale[0] or 0), measured=float(room[2] or 0), paused=sale[1] == b"1",
            closed=room[3] == b"1", waiting=int(waiting), available=int(sale[2] or 0),
            outstanding=int(outstanding), oversubscribe=float(sale[3] or 1),
            starts_ms=int(sale[4] or 0),
        )
        last = eta_range(r, max(0, int(waiting) - 1) if now_ms >= r.starts_ms else None, now_ms)
        out[sid] = {
            "waiting": int(waiting),
            "admitted_outstanding": int(outstanding),
            "admitted_total": int(room[0] or 0),
            "used": int(used),
            "expired": int(room[1] or 0),
            "admit_per_s": int(r.rate),
            "measured_admit_per_s": round(r.measured, 3),
            "paused": r.paused,
            "closed": r.closed,
            # the ETA of the last place (None: unknown, paused or waiting on held stock)
            "eta_last_low_s": None if last is None else last[0],
            "eta_last_high_s": None if last is None else last[1],
        }
    return out


ADMIN_FIELDS = ("waiting", "admitted_outstanding", "admitted_total", "used", "expired",
                "admit_per_s", "measured_admit_per_s", "paused")


async def admin_view(b: Backends, sale_id: str) -> dict[str, Any]:
    await _room_of(b, sale_id)
    figs = (await figures_many(b, [sale_id]))[sale_id]
    return {f: figs[f] for f in ADMIN_FIELDS}


async def configure(b: Backends, sale_id: str, room: RoomSettings) -> Configured:
    """Copy the settings into Redis's sale hash (SALE_MISSING: the hash is missing)."""
    k = b.keys(sale_id)
    return Configured(int(await b.scripts.room_configure(keys=[k.sale], args=room.redis_args())))


async def patch(b: Backends, sale_id: str, body: WaitingRoomPatch) -> dict[str, Any]:
    """Pause, resume, change the rate: PostgreSQL first (a rebuild restores it),
    then the sale hash every admitter and poll reads."""
    await _room_of(b, sale_id)  # 404 / 409 before anything changes
    delta = {f: v for f, v in msgspec.structs.asdict(body).items() if v is not msgspec.UNSET}
    raw = await b.pg.fetchval(  # merged in one statement: concurrent PATCHes lose nothing
        "UPDATE sales SET waiting_room = waiting_room || $2::jsonb "
        "WHERE sale_id = $1 AND waiting_room IS NOT NULL RETURNING waiting_room",
        sale_id, orjson.dumps(delta).decode(),
    )
    new = RoomSettings.from_row(raw)
    if new is None:
        raise errors.WaitingRoomOff()
    try:
        await configure(b, sale_id, new)
    except (RedisError, OSError) as exc:
        log.warning("waiting room of %s changed in PostgreSQL, Redis step failed: %r",
                    sale_id, exc)
        raise errors.Unavailable(
            "the change is committed in PostgreSQL but not yet in Redis; retry to apply it"
        ) from exc
    return await admin_view(b, sale_id)
