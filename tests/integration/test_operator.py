"""The operator's view over real Redis and PostgreSQL: ending a sale, the
admin event stream, request ids, JSON logs (issue 15)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession, ClientTimeout

from flashsale.config import Settings
from flashsale.ops import logs
from flashsale.web.request_id import HEADER
from tests.support import Api, poison_order, running_app

END_EFFECTIVE_WITHIN_S = 1.0


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


async def test_end_sale_refuses_reservations_on_every_front(
    api: Api, settings: Settings
) -> None:
    sale = await api.create_sale(stock=100, per_user_limit=10)
    sid = sale["sale_id"]
    async with running_app(settings) as other:  # a second front process on the same backends
        assert (await other.reserve(sid, "before"))[0] == 202
        before = datetime.now(UTC)
        status, ended, _ = await api.request(
            "POST", f"/api/v1/sales/{sid}/end", headers=api.admin
        )
        assert status == 200, ended
        assert ended["status"] == "ended"
        assert before - timedelta(seconds=1) <= _parse(ended["ends_at"]) <= datetime.now(UTC)
        t0 = time.monotonic()
        while True:  # the other front refuses within a second
            code, body = await other.reserve(sid, f"after-{time.monotonic_ns()}")
            if code == 409 and body["error"]["code"] == "sale_not_active":
                break
            assert time.monotonic() - t0 < END_EFFECTIVE_WITHIN_S, (code, body)
        effective_s = time.monotonic() - t0
        code, body = await api.reserve(sid, "late")
        assert (code, body["error"]["code"]) == (409, "sale_not_active")
    # ending an ended sale returns it unchanged
    status, again, _ = await api.request("POST", f"/api/v1/sales/{sid}/end", headers=api.admin)
    assert status == 200 and again == ended
    status, got, _ = await api.request("GET", f"/api/v1/sales/{sid}")
    assert got == ended
    # the held order stays: the ledger counts it
    ledger = await api.ledger(sid)
    assert ledger["pending"] == 1 and ledger["consistent"]
    print(f"end effective on the second front after {effective_s * 1000:.1f} ms")


async def test_end_sale_before_it_starts_and_errors(api: Api) -> None:
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    sale = await api.create_sale(starts_at=later)
    status, ended, _ = await api.request(
        "POST", f"/api/v1/sales/{sale['sale_id']}/end", headers=api.admin
    )
    assert status == 200 and ended["status"] == "ended", ended
    assert _parse(ended["starts_at"]) < _parse(ended["ends_at"])
    code, body = await api.reserve(sale["sale_id"], "u")
    assert (code, body["error"]["code"]) == (409, "sale_not_active")
    status, body, _ = await api.request("POST", "/api/v1/sales/sl_nosuchsale00/end",
                                        headers=api.admin)
    assert (status, body["error"]["code"]) == (404, "sale_not_found")
    status, body, _ = await api.request("POST", f"/api/v1/sales/{sale['sale_id']}/end")
    assert (status, body["error"]["code"]) == (401, "unauthorized")


async def _read_events(
    session: ClientSession, url: str, token: str, n: int, timeout_s: float = 10.0
) -> tuple[list[dict[str, Any]], Any]:
    events: list[dict[str, Any]] = []
    async with session.get(
        url, headers={"Authorization": f"Bearer {token}"},
        timeout=ClientTimeout(total=timeout_s),
    ) as r:
        assert r.status == 200, await r.text()
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                frame, buf = buf.split(b"\n\n", 1)
                lines = frame.split(b"\n")
                if lines[0] == b"event: figures":
                    events.append({"at": time.monotonic(), **orjson.loads(lines[1][6:])})
            if len(events) >= n:
                return events, r.headers
    raise AssertionError("stream ended early")


async def test_admin_events_stream_live_figures(api: Api, settings: Settings) -> None:
    sale = await api.create_sale(stock=50, per_user_limit=5)
    sid = sale["sale_id"]
    for i in range(7):
        assert (await api.reserve(sid, f"u{i % 3}", quantity=1))[0] == 202
    await api.drain(sid)
    for i in range(3):
        assert (await api.reserve(sid, f"v{i}", quantity=2))[0] == 202
    code, body = await api.reserve(sid, "u0", quantity=3)  # u0 holds 3 of its 5
    assert (code, body["error"]["code"]) == (409, "limit_exceeded")
    other = (await api.create_sale(stock=5))["sale_id"]  # live, no reservation
    expected = await api.ledger(sid)
    events, headers = await _read_events(
        api.session, api.base + "/api/v1/admin/events", settings.admin_token, 3
    )
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers[HEADER]
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(events)]
    assert all(g <= 1.5 for g in gaps), gaps  # at least one event a second
    last = events[-1]
    mine = [s for s in last["sales"] if s["sale"]["sale_id"] == sid]
    assert len(mine) == 1
    figures = mine[0]["figures"]
    for k in ("stock", "available", "pending", "awaiting_payment", "paid", "shipped",
              "expired", "cancelled", "failed"):
        assert figures[k] == expected[k], (k, figures, expected)
    assert mine[0]["consistent"] is True
    assert mine[0]["stream"] == {"lag": 3, "pending_entries": 0, "dead_letters": 0}
    series = last["series"]
    assert len(series["t"]) == len(series["p50_ms"]) == len(series["p99_ms"])
    # 10 accepted reservations appear in the per-second counts (flushed every second)
    assert sum(series["outcomes"].get("accepted", [])) >= 10, series["outcomes"]
    # ... and in the sale's own series: exactly the reservations made for it
    own = mine[0]["series"]
    assert own is not None and own["t"] == series["t"]
    assert {k: sum(v) for k, v in own["outcomes"].items()} == {"accepted": 10, "limit_exceeded": 1}
    assert len(own["p50_ms"]) == len(own["p99_ms"]) == len(own["t"])
    seconds = range(len(own["t"]))
    busy = [i for i in seconds if any(v[i] for v in own["outcomes"].values())]
    assert busy and all(0 < own["p50_ms"][i] <= own["p99_ms"][i] for i in busy), own
    assert all(own["p50_ms"][i] is None for i in seconds if i not in busy)
    other_series = [s for s in last["sales"] if s["sale"]["sale_id"] == other]
    assert other_series and other_series[0]["series"] is None  # no reservation: no series
    assert "consumer" in last["alive"] and "compensator" in last["alive"]
    # no token, and a wrong one: 401
    status, body, _ = await api.request("GET", "/api/v1/admin/events")
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, body, _ = await api.request(
        "GET", "/api/v1/admin/events", headers={"Authorization": "Bearer nope"}
    )
    assert status == 401


async def test_admin_event_streams_are_bounded(settings: Settings) -> None:
    async with running_app(replace(settings, admin_streams_max=1)) as api:
        async with api.session.get(
            api.base + "/api/v1/admin/events", headers=api.admin
        ) as first:
            assert first.status == 200
            await first.content.readline()
            status, body, r = await api.request("GET", "/api/v1/admin/events", headers=api.admin)
            assert (status, body["error"]["code"]) == (503, "overloaded")
            assert r.headers["Retry-After"]
        async def reopened() -> bool:
            async with api.session.get(
                api.base + "/api/v1/admin/events", headers=api.admin
            ) as again:
                return again.status == 200
        deadline = time.monotonic() + 5
        while not await reopened():  # the closed stream's slot comes back
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("abc-123_X.y", True), ("x" * 128, True), ("x" * 129, False), ("bad id", False),
     ("é", False), ("", False), (None, False)],
)
async def test_every_response_carries_a_request_id(
    api: Api, sent: str | None, kept: bool
) -> None:
    headers = {} if sent is None else {HEADER: sent}
    for method, path in (("GET", "/healthz"), ("GET", "/api/v1/sales/sl_unknown00000"),
                         ("GET", "/no/such/route"), ("POST", "/api/v1/sales")):
        _status, _body, r = await api.request(method, path, headers=headers)
        got = r.headers.get(HEADER)
        assert got, (method, path)
        if kept:
            assert got == sent
        else:
            assert got != sent and 1 <= len(got) <= 128


async def test_json_logs_carry_request_and_sale_ids(api: Api) -> None:
    sale = await api.create_sale()
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextFilter())
    access = logging.getLogger("flashsale.access")
    access.addHandler(handler)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        await api.request("GET", f"/api/v1/sales/{sale['sale_id']}",
                          headers={HEADER: "req-json-1"})
        code, order = await api.reserve(sale["sale_id"], "logger")
        assert code == 202
        await api.request("GET", f"/api/v1/orders/{order['order_id']}",
                          headers={**api.buyer("logger"), HEADER: "req-json-2"})
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
    lines = [orjson.loads(line) for line in buf.getvalue().splitlines()]
    assert len(lines) == 3, buf.getvalue()
    for line in lines:
        assert {"time", "level", "logger", "message", "request_id"} <= set(line)
        assert line["logger"] == "flashsale.access" and line["level"] == "INFO"
        datetime.fromisoformat(line["time"])
    assert lines[0]["request_id"] == "req-json-1"
    assert lines[0]["sale_id"] == sale["sale_id"] and "order_id" not in lines[0]
    assert lines[0]["status"] == 200 and lines[0]["method"] == "GET"
    assert lines[1]["sale_id"] == sale["sale_id"]
    assert lines[1]["order_id"] == order["order_id"]  # the reservation names the order it made
    assert lines[2]["request_id"] == "req-json-2"
    assert lines[2]["order_id"] == order["order_id"]


@contextlib.contextmanager
def json_lines(logger_name: str) -> Iterator[io.StringIO]:
    """What ``logger_name`` logs meanwhile, as FLASHSALE_LOG_FORMAT=json writes it."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield buf
    finally:
        logger.removeHandler(handler)


async def test_json_log_of_a_dead_lettered_entry_names_its_sale_and_order(
    settings: Settings,
) -> None:
    """An order PostgreSQL refuses (a buyer id past its CHECK) is dead-lettered
    by the consumer; its log line carries the sale and the order as fields."""
    async with running_app(replace(settings, consumer_max_deliveries=1)) as api:
        sid = (await api.create_sale(stock=5))["sale_id"]
        poison = await poison_order(api.backends, sid)
        with json_lines("flashsale.core.dead_letters") as buf:
            await api.drain(sid)
    lines = [orjson.loads(line) for line in buf.getvalue().splitlines()]
    dead = [line for line in lines if line["message"].startswith("dead-lettered")]
    assert len(dead) == 1, buf.getvalue()
    assert dead[0]["level"] == "ERROR"
    assert dead[0]["sale_id"] == sid and dead[0]["order_id"] == poison.order_id, dead[0]
    print(f"\ndead-letter line: {buf.getvalue().strip()}")


async def test_access_log_can_be_switched_off(settings: Settings) -> None:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    access = logging.getLogger("flashsale.access")
    access.addHandler(handler)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        async with running_app(replace(settings, access_log=False)) as api:
            await api.request("GET", "/healthz")
        assert buf.getvalue() == ""
        async with running_app(settings) as api:
            await api.request("GET", "/healthz")
        assert "GET /healthz 200" in buf.getvalue()
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
