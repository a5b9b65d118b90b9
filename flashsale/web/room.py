"""The waiting room's HTTP handlers (contract v1.1, "Waiting room"): join, poll,
the admin GET/PATCH, and the waiting page. The logic is flashsale/room/."""

from __future__ import annotations

from aiohttp import web

from flashsale import errors, validate
from flashsale.room import tickets
from flashsale.schemas.bodies import WaitingRoomPatch
from flashsale.schemas.decode import BodyReader
from flashsale.web import front
from flashsale.web.keys import BACKENDS, LOTTERY
from flashsale.web.pages import static_page
from flashsale.web.replies import json_response
from flashsale.web.routes import _missing_in_redis, admin, buyer, read_body

READ_PATCH = BodyReader(WaitingRoomPatch)


async def join(request: web.Request) -> web.Response:
    user_id = buyer(request)
    await read_body(request)  # no body is expected; whatever came is read and ignored
    sale_id = validate.sale_id(request.match_info["sale_id"])
    try:
        ticket, created = await tickets.join(
            request.app[BACKENDS], sale_id, user_id, request.app[LOTTERY]
        )
    except errors.SaleNotFound:
        await _missing_in_redis(request, sale_id)
        raise
    return json_response(ticket, 201 if created else 200)


async def get_ticket(request: web.Request) -> web.Response:
    user_id = buyer(request)
    sale_id = validate.sale_id(request.match_info["sale_id"])
    try:
        ticket = await tickets.poll(
            request.app[BACKENDS], sale_id, request.match_info["ticket_id"], user_id
        )
    except errors.SaleNotFound:
        await _missing_in_redis(request, sale_id)
        raise
    return json_response(ticket)


async def get_room(request: web.Request) -> web.Response:
    admin(request)
    return json_response(
        await tickets.admin_view(request.app[BACKENDS], request.match_info["sale_id"])
    )


async def patch_room(request: web.Request) -> web.Response:
    admin(request)
    body = READ_PATCH(await read_body(request))
    return json_response(
        await tickets.patch(request.app[BACKENDS], request.match_info["sale_id"], body)
    )


async def wait_page(request: web.Request) -> web.Response:
    validate.sale_id(request.match_info["sale_id"])
    return static_page("wait.html", "text/html")


async def wait_script(_request: web.Request) -> web.Response:
    return static_page("wait.js", "application/javascript")


def setup(app: web.Application) -> None:
    body = front.expect_continue
    app.router.add_post("/api/v1/sales/{sale_id}/queue", join, expect_handler=body)
    app.router.add_get("/api/v1/sales/{sale_id}/queue/{ticket_id}", get_ticket, allow_head=False)
    app.router.add_get("/api/v1/admin/sales/{sale_id}/waiting-room", get_room, allow_head=False)
    app.router.add_patch(
        "/api/v1/admin/sales/{sale_id}/waiting-room", patch_room, expect_handler=body
    )
    app.router.add_get("/sales/{sale_id}/wait", wait_page, allow_head=False)
    app.router.add_get("/wait/wait.js", wait_script, allow_head=False)
