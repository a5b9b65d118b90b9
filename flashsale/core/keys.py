"""Redis key layout. Every key of one sale shares the hash tag ``{sale_id}``.

    <p>:{<sale>}:sale       hash: stock, available, pending, limit, price,
                            starts_ms, ends_ms, hold_ms
    <p>:{<sale>}:users      hash: user_id -> quantity held
    <p>:{<sale>}:holds      hash: order_id -> "<qty>:<user_id>" while it holds stock
    <p>:{<sale>}:pending    hash: order_id -> its record (core/record.py) until persisted
    <p>:{<sale>}:stream     stream of accepted orders (o <order_id>, r <record>),
                            consumed by the persister
    <p>:{<sale>}:restocks   set of restock ids applied
    <p>:{<sale>}:dlq        dead-lettered stream entries (capped)
    <p>:{<sale>}:void       sorted set: order ids found unreserved after a lost
                            reply (score: ms); reserve_batch never reserves them
    <p>:{<sale>}:room       hash: the waiting room's state (token bucket, counters,
                            closed flag, measured rate); its settings are in the
                            sale hash (room, room_rate, room_pass_ms, room_oversub,
                            room_paused), see flashsale/room/keys.py
    <p>:{<sale>}:room:*     the room's tickets, queue, heartbeats, passes, log
    <p>:{<sale>}:fence      a write whose replication WAIT confirms (replication.py)
    <p>:idem:<len>:<user>:<key>      idempotency record (standalone Redis), or
    <p>:{<sale>}:idem:<len>:<user>:<key>  (Redis Cluster: same slot as the sale)
    <p>:idemclaim:<len>:<user>:<key> Redis Cluster only: "<sale>|<qty>", the sale and
                            body the buyer's key is bound to, across sales (SET NX
                            before the reservation; TTL longer than the record's)

The user id is length-prefixed so that no two (user, key) pairs share a name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SaleKeys:
    prefix: str
    sale_id: str
    cluster: bool = False

    @property
    def tag(self) -> str:
        return f"{self.prefix}:{{{self.sale_id}}}"

    @property
    def sale(self) -> str:
        return f"{self.tag}:sale"

    @property
    def users(self) -> str:
        return f"{self.tag}:users"

    @property
    def holds(self) -> str:
        return f"{self.tag}:holds"

    @property
    def pending(self) -> str:
        return f"{self.tag}:pending"

    @property
    def stream(self) -> str:
        return f"{self.tag}:stream"

    @property
    def restocks(self) -> str:
        return f"{self.tag}:restocks"

    @property
    def dlq(self) -> str:
        return f"{self.tag}:dlq"

    @property
    def void(self) -> str:
        return f"{self.tag}:void"

    # -- the waiting room (flashsale/room/, issue 12) --------------------------------

    @property
    def room(self) -> str:
        return f"{self.tag}:room"

    @property
    def room_queue(self) -> str:
        return f"{self.tag}:room:queue"

    @property
    def room_tickets(self) -> str:
        return f"{self.tag}:room:tickets"

    @property
    def room_buyers(self) -> str:
        return f"{self.tag}:room:buyers"

    @property
    def room_beats(self) -> str:
        return f"{self.tag}:room:beats"

    @property
    def room_admitted(self) -> str:
        return f"{self.tag}:room:admitted"

    @property
    def room_used(self) -> str:
        return f"{self.tag}:room:used"

    @property
    def room_log(self) -> str:
        return f"{self.tag}:room:log"

    def room_keys(self) -> tuple[str, ...]:
        return (
            self.room, self.room_queue, self.room_tickets, self.room_buyers, self.room_beats,
            self.room_admitted, self.room_used, self.room_log,
        )

    @property
    def fence(self) -> str:
        return f"{self.tag}:fence"

    def idempotency(self, user_id: str, key: str) -> str:
        scope = self.tag if self.cluster else self.prefix
        return f"{scope}:idem:{len(user_id)}:{user_id}:{key}"

    def idempotency_claim(self, user_id: str, key: str) -> str:
        """Redis Cluster: the buyer's claim of a key for one sale and body, in a
        slot of its own (reserve.Reserver._claim), since the record above lives
        in the sale's slot and cannot see the buyer's other sales."""
        return f"{self.prefix}:idemclaim:{len(user_id)}:{user_id}:{key}"

    def all_sale_keys(self) -> tuple[str, ...]:
        return (
            self.sale, self.users, self.holds, self.pending, self.stream, self.restocks,
            self.dlq, self.void, *self.room_keys(),
        )
