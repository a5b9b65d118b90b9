"""The accepted order: its one record in Redis, its one Python type, its one row.

``lua/reserve_batch-8.lua`` encodes an accepted order once, as one string, the
record, and keeps that same string wherever the order is kept until the
consumer has persisted it::

    record = "<user_id>\\t<quantity>\\t<amount_cents>\\t<expires_ms>\\t<created_ms>\\t<key>"

    stream entry   <p>:{<sale>}:stream    fields  o <order_id>   r <record>
    pending hash   <p>:{<sale>}:pending   <order_id> -> <record>

Fields are tab-separated and no field can hold a tab (reserve.py refuses user
ids and keys with control characters before the script runs); the key is
empty when the order has none. ``rebuild_sale-6.lua`` reads the quantity, the
second field, of each pending record. What the buyer is told, the acceptance,
is the order's answer rather than its record::

    acceptance = "<order_id>\\t<quantity>\\t<amount_cents>\\t<expires_ms>"

reserve_batch's reply for an accepted item, the detail of its idempotency
record (``"<fingerprint>\\n0\\n<acceptance>"``, unchanged) and resolve_orders'
answer for a reserved id. Every reader parses through this module into one
type, ``Order``, and the one statement that writes an order's row from it is
``insert`` below (the consumer's, and a release's of an order not persisted).

Stream entries written before the record existed (fields ``o u q a e c k``)
are still read, so an upgrade persists what the stream held.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import asyncpg

from flashsale.core.clients import Conn, as_text
from flashsale.validate import ORDER_ID_RE, iso_ms

STREAM_ORDER_ID = b"o"  # the stream entry's fields: the order id, and the record
STREAM_RECORD = b"r"
SEP = "\t"
_LEGACY = (b"u", b"q", b"a", b"e", b"c", b"k")  # a stream entry's fields before the record


class Malformed(Exception):
    """A record, stream entry or acceptance that cannot be parsed."""


class Order(NamedTuple):
    """One accepted order (a tuple: made once per drained row)."""

    order_id: str
    sale_id: str
    user_id: str
    quantity: int
    amount_cents: int
    created_ms: int
    expires_ms: int
    idempotency_key: str | None
    entry_id: str = ""  # its stream entry id when read from the stream, else ""

    def body(self) -> dict[str, Any]:
        """The order as the buyer sees it while it is pending (the 202's body)."""
        return {
            "order_id": self.order_id, "sale_id": self.sale_id, "user_id": self.user_id,
            "quantity": self.quantity, "amount_cents": self.amount_cents, "status": "pending",
            "expires_at": iso_ms(self.expires_ms),
        }


def new_order_id(sale_id: str, now_ms: int) -> str:
    """Time-ordered, globally unique, and names its sale (routing in Redis)."""
    return f"{sale_id}-{now_ms:011x}{secrets.token_hex(5)}"


def created_ms_of(order_id: str) -> int:
    """The time an order id made by ``new_order_id`` was made (0 for another id)."""
    return int(order_id[16:27], 16) if ORDER_ID_RE.fullmatch(order_id) else 0


def _order(
    order_id: str, sale_id: str, user: str, qty: str | bytes, amount: str | bytes,
    expires: str | bytes, created: str | bytes, key: str, entry_id: str = "",
) -> Order:
    quantity, amount_cents = int(qty), int(amount)
    if quantity < 1 or amount_cents < 0:
        raise ValueError("bad quantity or amount")
    return Order(order_id, sale_id, user, quantity, amount_cents, int(created), int(expires),
                 key or None, entry_id)


def from_record(sale_id: str, order_id: str, record: bytes | str, entry_id: str = "") -> Order:
    """An order from its record (a pending hash value, a stream entry's ``r``)."""
    try:
        user, qty, amount, expires, created, key = as_text(record).split(SEP)
        return _order(order_id, sale_id, user, qty, amount, expires, created, key, entry_id)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Malformed(f"{entry_id or order_id}: {exc!r}") from exc


def from_entry(sale_id: str, entry_id: str, fields: Mapping[bytes, bytes]) -> Order:
    """An order from its stream entry (see the module docstring)."""
    try:
        order_id = fields[STREAM_ORDER_ID].decode()
        record = fields.get(STREAM_RECORD)
        if record is not None:
            return from_record(sale_id, order_id, record, entry_id)
        user, qty, amount, expires, created, key = (fields[f] for f in _LEGACY)
        return _order(order_id, sale_id, user.decode(), qty, amount, expires, created,
                      key.decode(), entry_id)
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise Malformed(f"{entry_id}: {exc!r}") from exc


def quantity_of(fields: Mapping[bytes, bytes]) -> int:
    """Best effort: the quantity an unreadable stream entry names (0 if none)."""
    record = fields.get(STREAM_RECORD)
    raw = record.split(SEP.encode())[1:2] if record is not None else [fields.get(b"q", b"0")]
    try:
        return max(0, int(raw[0])) if raw else 0
    except ValueError:
        return 0


def from_acceptance(
    sale_id: str, user_id: str, idempotency_key: str | None, created_ms: int, acceptance: str
) -> Order:
    """An order from the acceptance the script answered (or the key's record
    kept), with what the front knows itself: the buyer, the key and when."""
    try:
        order_id, qty, amount, expires = acceptance.split(SEP)
        return _order(order_id, sale_id, user_id, qty, amount, expires, str(created_ms),
                      idempotency_key or "")
    except ValueError as exc:
        raise Malformed(f"acceptance {acceptance!r}: {exc!r}") from exc


# The one statement that writes orders' rows from their records: persisted
# (status awaiting_payment) by the consumer, or already released (cancelled,
# expired, failed: with its release row, in the same statement) before the
# consumer got to it. ON CONFLICT DO NOTHING: a row that exists (persisted,
# or released first) wins, and a later insert of the same order changes
# nothing; so does one colliding on (sale, buyer, key) while not failed.
_INSERT = """
WITH o AS (
    INSERT INTO orders (order_id, sale_id, user_id, quantity, amount_cents, status,
                        idempotency_key, created_at, expires_at)
    SELECT o, s, u, q, a, $9, k, to_timestamp(c::float8 / 1000), to_timestamp(e::float8 / 1000)
    FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::text[],
                $7::bigint[], $8::bigint[]) AS t(o, s, u, q, a, k, c, e)
    ON CONFLICT DO NOTHING
    RETURNING order_id, sale_id, quantity
), r AS (
    INSERT INTO releases (order_id, sale_id, quantity, reason, actor, detail)
    SELECT order_id, sale_id, quantity, $9, $10, $11 FROM o WHERE $9 <> 'awaiting_payment'
    RETURNING 1
)
SELECT order_id, sale_id, quantity FROM o
"""


async def insert(
    runner: Conn | asyncpg.Pool, orders: Sequence[Order], status: str,
    actor: str = "", detail: str | None = None,
) -> list[asyncpg.Record]:
    """Insert the orders' rows in one statement, with ``status``; for a released
    status ('cancelled', 'expired', 'failed': the release reason too) each
    inserted order gets its release row (``actor``, ``detail``). Returns the
    rows inserted (order_id, sale_id, quantity); the others existed already."""
    if not orders:
        return []
    rows: list[asyncpg.Record] = await runner.fetch(
        _INSERT,
        [o.order_id for o in orders], [o.sale_id for o in orders],
        [o.user_id for o in orders], [o.quantity for o in orders],
        [o.amount_cents for o in orders], [o.idempotency_key for o in orders],
        [o.created_ms for o in orders], [o.expires_ms for o in orders], status, actor, detail,
    )
    return rows
