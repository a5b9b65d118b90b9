"""JSON answers in the contract's shape: a leaf module (nothing of flashsale
imported), so the HTTP front, its middleware and the workers' small HTTP
servers (flashsale/ops/worker_http.py) answer alike without importing each
other."""

from __future__ import annotations

import orjson
from aiohttp import web


def json_response(body: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def error_response(status: int, code: str, message: str, retry_after_s: int | None) -> web.Response:
    """The contract's error body, ``{"error": {"code", "message"}}``, and its Retry-After."""
    resp = json_response({"error": {"code": code, "message": message}}, status)
    if retry_after_s is not None:
        resp.headers["Retry-After"] = str(retry_after_s)
    return resp
