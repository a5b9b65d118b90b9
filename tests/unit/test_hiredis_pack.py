"""The hiredis packer sends exactly the bytes redis-py's Python packer sends."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection
from redis.typing import EncodableT

from flashsale.core.backends import HiredisPackConnection

COMMANDS: list[tuple[EncodableT, ...]] = [
    ("PING",),
    ("EVALSHA", "a" * 40, 2, "fs:{sl_x}:sale", "fs:{sl_x}:users", 1700000000000, "x\x1fy"),
    ("XADD", "s", "*", "o", "sl_a-1", "q", 3, "a", 1500, "k", ""),
    ("SET", "k", "ünïcødé ✓", "EX", 86400),
    ("SET", b"raw", b"\x00\xff bytes", "PX", 1.5),
    ("CLIENT SETNAME", "flashsale"),  # a multi-word command name is split
    (b"SCRIPT LOAD", "return 1"),
]


@pytest.mark.parametrize("args", COMMANDS)
def test_same_bytes_as_redis_py(args: tuple[EncodableT, ...]) -> None:
    slow = b"".join(Connection().pack_command(*args))
    fast = b"".join(HiredisPackConnection().pack_command(*args))
    assert fast == slow
