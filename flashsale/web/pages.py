"""The pages a person looks at (flashsale/web/static/: plain HTML, JS and CSS),
served with one set of headers: a leaf module (nothing of flashsale imported),
so the operator's view (web/admin.py) and the waiting room's page
(web/room.py) serve alike without importing each other."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).resolve().parent / "static"
# the page runs only its own script and talks only to this origin
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def static_page(name: str, content_type: str) -> web.Response:
    """flashsale/web/static/``name``, with the pages' headers."""
    return web.Response(body=(STATIC / name).read_bytes(), content_type=content_type,
                        charset="utf-8", headers=PAGE_HEADERS)
