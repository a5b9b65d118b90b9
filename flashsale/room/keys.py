"""The waiting room's Redis keys, in the sale's hash tag (flashsale/core/keys.py
names them), and the KEYS list of each room script, in one place.

    <p>:{<sale>}:sale            room settings copied from PostgreSQL: room ("1"),
                                 room_rate, room_pass_ms, room_oversub, room_paused
    <p>:{<sale>}:room            hash: tokens, last_ms (the admission bucket), seq
                                 (arrivals after the start), closed, closed_ms,
                                 admitted_total, expired, first_ms, measured
    <p>:{<sale>}:room:queue      zset: waiting ticket -> order score (lottery draws
                                 in [0, 1) before the start, 1 + arrival after)
    <p>:{<sale>}:room:tickets    hash: ticket -> "<state w|a|x>\t<pass_exp_ms>\t<user>"
    <p>:{<sale>}:room:buyers     hash: user -> ticket (one ticket per buyer)
    <p>:{<sale>}:room:beats      zset: waiting ticket -> heartbeat deadline (ms)
    <p>:{<sale>}:room:admitted   zset: ticket -> pass expiry (ms), passes not used yet
    <p>:{<sale>}:room:used       hash: ticket -> order id (written by reserve_batch-8.lua)
    <p>:{<sale>}:room:log        list: "<ms>:<n>" per admission step (newest first, 256)
"""

from __future__ import annotations

from flashsale.core.keys import SaleKeys


def join_keys(k: SaleKeys) -> list[str]:
    return [k.sale, k.room, k.room_queue, k.room_tickets, k.room_buyers, k.room_beats]


def poll_keys(k: SaleKeys) -> list[str]:
    return [k.sale, k.room, k.room_queue, k.room_tickets, k.room_beats, k.room_used,
            k.room_admitted]


def admit_keys(k: SaleKeys) -> list[str]:
    return [k.sale, k.room, k.room_queue, k.room_tickets, k.room_beats, k.room_admitted,
            k.room_used, k.room_log]


def close_keys(k: SaleKeys) -> list[str]:
    return [k.sale, k.room, k.stream]
