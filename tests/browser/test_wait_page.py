"""The waiting page in a real browser: headless Chromium (Debian's, installed by
scripts/ensure-tools.sh, driven as in test_dashboard) on GET /sales/{id}/wait,
against a front with its consumer and compensator (so the admitter) running.

The buyer enters the token and joins behind 30 tickets while the room is
paused: the page shows the API's position and an unknown ETA. The operator
resumes at 10/s: the page's place moves up and shows an ETA range, as the API
does; once admitted, the page reserves with its pass, and the API has that
order, the buyer's, and the ticket `used`. The screenshot of the waiting page
is kept in docs/waiting-room.png.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from flashsale.room import keys as rk
from flashsale.room.tickets import new_ticket_id
from flashsale.web.app import Workers
from tests.browser.test_dashboard import REPO, chromium, in_thread
from tests.support import Api, fresh_database, running_app, test_settings

SCREENSHOT = REPO / "docs" / "waiting-room.png"


@pytest.fixture
async def live_api(server_urls: tuple[str, str]) -> AsyncIterator[Api]:
    async with fresh_database(server_urls[1], "flashsale_browser") as dsn:
        settings = test_settings(server_urls[0], dsn)
        async with running_app(settings, Workers(consumer=True, compensator=True)) as api:
            yield api


def text(driver: WebDriver, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text).strip()


def attr(driver: WebDriver, css: str, name: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).get_attribute(name) or "")


async def test_wait_page_shows_the_place_and_reserves_with_the_pass(live_api: Api) -> None:
    api, b = live_api, live_api.backends
    sale = await api.create_sale(name="Viral sneaker", stock=50,
                                 waiting_room={"admit_per_s": 10, "pass_seconds": 60})
    sid = sale["sale_id"]
    room = f"/api/v1/admin/sales/{sid}/waiting-room"
    status, _, _ = await api.request("PATCH", room, headers=api.admin, json={"paused": True})
    assert status == 200
    k = b.keys(sid)
    now = int(time.time() * 1000)
    for i in range(30):  # 30 buyers ahead (heartbeats long enough for the test)
        await b.scripts.room_join(keys=rk.join_keys(k), args=[
            now, f"ahead-{i}", new_ticket_id(), secrets.randbits(53), 1000, 120_000])
    user = "page-buyer"
    with chromium() as driver:
        wait = WebDriverWait(driver, 15)
        await in_thread(lambda: driver.get(f"{api.base}/sales/{sid}/wait"))
        box = await in_thread(lambda: wait.until(ec.visibility_of_element_located(
            (By.ID, "token"))))
        await in_thread(lambda: box.send_keys(api.token(user)))
        await in_thread(lambda: driver.find_element(By.ID, "join").click())
        await in_thread(lambda: wait.until(lambda d: attr(d, "#state", "data-state")
                                           == "waiting"))
        ticket_id = await in_thread(lambda: text(driver, "#ticket"))
        path = f"/api/v1/sales/{sid}/queue/{ticket_id}"
        status, t, _ = await api.request("GET", path, headers=api.buyer(user))
        assert status == 200 and t["state"] == "waiting" and t["position"] == 30, t
        assert t["eta_seconds"] is None  # paused
        assert await in_thread(lambda: attr(driver, "#position", "data-position")) == "30"
        assert await in_thread(lambda: text(driver, "#eta")) == "unknown for now"
        assert "Viral sneaker" in await in_thread(lambda: text(driver, "#sale-name"))
        assert await in_thread(driver.get_cookies) == []

        status, _, _ = await api.request("PATCH", room, headers=api.admin,
                                         json={"paused": False})
        assert status == 200
        # the place moves up and an ETA range appears, as the API shows it
        seen: list[tuple[int, int, int]] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15:
            # the three read in one script: one render of the page, never a mix of two
            pos, low, high = await in_thread(lambda: driver.execute_script(
                "const p = document.querySelector('#position'),"
                " e = document.querySelector('#eta');"
                " return [p.dataset.position || '', e.dataset.low || '', e.dataset.high || ''];"
            ))
            if pos and low and high and int(pos) < 30:
                seen.append((int(pos), int(low), int(high)))
                if len(seen) == 1:
                    SCREENSHOT.parent.mkdir(exist_ok=True)
                    assert await in_thread(lambda: driver.save_screenshot(str(SCREENSHOT)))
                    status, t, _ = await api.request("GET", path, headers=api.buyer(user))
                    assert t["position"] <= int(pos), (t, pos)  # the API is never behind
                    assert t["eta_seconds"]["low"] <= int(high), t
            if await in_thread(lambda: attr(driver, "#state", "data-state")) != "waiting":
                break
            await asyncio.sleep(0.1)
        assert seen, "the page never showed a moving place with an ETA"
        assert all(lo <= hi for _p, lo, hi in seen)
        # admitted: the page reserves with the pass
        order_id = await in_thread(lambda: WebDriverWait(driver, 20).until(
            lambda d: attr(d, "#order", "data-order-id")))
        took = time.monotonic() - t0
    status, order, _ = await api.request("GET", f"/api/v1/orders/{order_id}",
                                         headers=api.buyer(user))
    assert status == 200 and order["user_id"] == user, order
    status, t, _ = await api.request("GET", path, headers=api.buyer(user))
    assert t["state"] == "used", t
    print(f"wait page: 30 ahead at 10/s, admitted and reserved {took:.1f} s after resume; "
          f"place/ETA seen {seen[:3]}...{seen[-2:]}")
