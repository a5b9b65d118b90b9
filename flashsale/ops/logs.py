"""Logging: plain text or one JSON object per line, with the request's context.

The request id, sale id and order id of the work at hand live in contextvars
(set by the request middleware, flashsale/web/request_id.py, from the path;
the order id by the reservation handler once its order is made; by a worker
around a line about one sale or order, ``with logs.context(...)``) and go
into every record logged meanwhile:
``FLASHSALE_LOG_FORMAT=json`` gives ``{"time", "level", "logger", "message",
"request_id"?, "sale_id"?, "order_id"?, "exc"?}`` per line, searchable by id.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flashsale_request_id", default=None
)
sale_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flashsale_sale_id", default=None
)
order_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flashsale_order_id", default=None
)
CONTEXT = (("request_id", request_id), ("sale_id", sale_id), ("order_id", order_id))


@contextlib.contextmanager
def context(*, sale: str | None = None, order: str | None = None) -> Iterator[None]:
    """The sale and order at hand (those given) for what is logged inside."""
    tokens = [(var, var.set(value)) for var, value in ((sale_id, sale), (order_id, order))
              if value]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Copies the context ids onto each record (text format shows them too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in CONTEXT:
            if not hasattr(record, name):
                setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ids only where there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, var in CONTEXT:
            value = getattr(record, name, None) or var.get()
            if value:
                out[name] = value
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [f"{name}={v}" for name, _ in CONTEXT if (v := getattr(record, name, None))]
        return f"{line} [{' '.join(ids)}]" if ids else line


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def setup(fmt: str = "text", level: str = "INFO") -> None:
    """Configure the root logger once: one stderr handler in ``fmt``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    try:
        root.setLevel(level.upper())
    except ValueError:
        root.setLevel(logging.INFO)
