"""The operator's dashboard in a real browser: headless Chromium (Debian's,
installed by scripts/ensure-tools.sh) drives GET /admin against a running
front with its consumer and compensator, on real Redis and PostgreSQL.

It enters the admin token, runs a burst of reservations through the API,
checks the figures shown reach the ledger's within 2 s, restocks through the
page (accepting the confirm dialog) and sees the new stock, and keeps a
screenshot of what it saw in docs/dashboard.png.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from flashsale.config import Settings
from flashsale.ops.live import FIGURES
from flashsale.web.app import Workers
from tests.support import Api, fresh_database, running_app, test_settings

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "dashboard.png"
REACH_LEDGER_WITHIN_S = 2.0
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1100",
)
T = TypeVar("T")


@contextmanager
def chromium() -> Iterator[WebDriver]:
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver_path, "chromium/chromedriver missing: make test installs them"
    profile = tempfile.mkdtemp(prefix="flashsale-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


async def in_thread(fn: Callable[[], T]) -> T:
    """Selenium blocks: keep the app's event loop serving meanwhile."""
    return await asyncio.to_thread(fn)


def shown(driver: WebDriver, sale_id: str) -> dict[str, int | None]:
    """The sale card's figures, read in one script: one render's (the page
    redraws on every event, so elements found in one call can be gone by the next)."""
    texts: dict[str, str] = driver.execute_script(
        "const card = document.querySelector(`article[data-sale=\"${arguments[0]}\"]`);"
        "const out = {};"
        "for (const f of arguments[1]) {"
        "  const td = card && card.querySelector(`td[data-figure=\"${f}\"]`);"
        "  out[f] = td ? td.textContent.trim() : '';"
        "}"
        "return out;",
        sale_id, list(FIGURES),
    )
    return {f: int(t) if t.lstrip("-").isdigit() else None for f, t in texts.items()}


def attributes(driver: WebDriver, css: str, *names: str) -> list[list[str | None]]:
    """Attributes of every element matching ``css``, read in one script (one render)."""
    rows: list[list[str | None]] = driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map(e => arguments[1].map(n => e.getAttribute(n)));",
        css, list(names),
    )
    return rows


@pytest.fixture
async def live_api(server_urls: tuple[str, str]) -> AsyncIterator[Api]:
    """A front with its consumer and compensator, on a database of its own
    (the compensator sweeps every sale of its database)."""
    async with fresh_database(server_urls[1], "flashsale_browser") as dsn:
        settings: Settings = test_settings(server_urls[0], dsn)
        async with running_app(settings, Workers(consumer=True, compensator=True)) as api:
            yield api


async def test_dashboard_shows_the_ledger_and_restocks(live_api: Api) -> None:
    api = live_api
    sale = await api.create_sale(name="Sneaker drop", stock=200, per_user_limit=4)
    sid = sale["sale_id"]
    with chromium() as driver:
        wait = WebDriverWait(driver, 10)
        await in_thread(lambda: driver.get(api.base + "/admin"))
        token_box = await in_thread(lambda: wait.until(ec.visibility_of_element_located(
            (By.ID, "token"))))
        await in_thread(lambda: token_box.send_keys(api.settings.admin_token))
        await in_thread(lambda: driver.find_element(By.ID, "login-button").click())
        await in_thread(lambda: wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, f'article[data-sale="{sid}"]'))))
        # the token is in session storage only: not in the URL, no cookie
        assert api.settings.admin_token not in driver.current_url
        assert await in_thread(driver.get_cookies) == []
        stored = await in_thread(lambda: driver.execute_script(
            "return sessionStorage.getItem('flashsale.adminToken')"))
        assert stored == api.settings.admin_token

        # a burst of reservations through the API: 80 buyers, 1-4 units each
        async def buy(i: int) -> int:
            code, _ = await api.reserve(sid, f"buyer{i % 80}", quantity=1 + i % 4,
                                        key=f"k{i}")
            return code
        codes: list[int] = []
        for wave in range(4):  # four waves half a second apart: a few seconds on the charts
            codes += await asyncio.gather(*(buy(wave * 40 + i) for i in range(40)))
            await asyncio.sleep(0.5)
        assert codes.count(202) > 0 and set(codes) <= {202, 409}

        async def settled() -> dict[str, Any]:  # the consumer drained the stream
            for _ in range(200):
                led = await api.ledger(sid)
                if led["pending"] == 0 and led["consistent"]:
                    return led
                await asyncio.sleep(0.05)
            raise AssertionError(f"ledger did not settle: {led}")
        ledger = await settled()
        t0 = time.monotonic()
        expected = {f: ledger[f] for f in FIGURES}
        while (seen := await in_thread(lambda: shown(driver, sid))) != expected:
            assert time.monotonic() - t0 < REACH_LEDGER_WITHIN_S, (seen, expected)
            await asyncio.sleep(0.05)
        reached_s = time.monotonic() - t0
        assert expected["awaiting_payment"] > 0

        # workers shown alive; the charts have the burst
        pills = {role: alive for role, alive in await in_thread(lambda: attributes(
            driver, "#workers .worker", "data-role", "data-alive"))}
        assert pills.get("consumer", "0") != "0" and pills.get("compensator", "0") != "0", pills
        async def charted(legend: str) -> bool:
            rows = await in_thread(lambda: attributes(driver, f"{legend} span", "data-series"))
            return ["accepted"] in rows
        # the service's rate chart, and the sale card's own
        for legend in ("#legend-rate", f'article[data-sale="{sid}"] .sale-legend-rate'):
            for _ in range(60):
                if await charted(legend):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"no 'accepted' series on the rate chart {legend}")

        # restock through the page, accepting the confirm dialog
        def restock() -> str:
            box = driver.find_element(By.CSS_SELECTOR, f'article[data-sale="{sid}"] .restock-qty')
            box.clear()
            box.send_keys("50")
            card = f'article[data-sale="{sid}"]'
            driver.find_element(By.CSS_SELECTOR, f"{card} button.restock").click()
            alert = WebDriverWait(driver, 5).until(ec.alert_is_present())
            text = alert.text
            alert.accept()
            return text
        confirm_text = await in_thread(restock)
        assert "Restock 50 units" in confirm_text and sid in confirm_text
        t1 = time.monotonic()
        while (await in_thread(lambda: shown(driver, sid)))["stock"] != 250:
            assert time.monotonic() - t1 < REACH_LEDGER_WITHIN_S
            await asyncio.sleep(0.05)
        restock_shown_s = time.monotonic() - t1
        assert (await api.ledger(sid))["stock"] == 250
        await asyncio.sleep(1.5)  # one more frame for the charts, then keep what we saw
        SCREENSHOT.parent.mkdir(exist_ok=True)
        assert await in_thread(lambda: driver.save_screenshot(str(SCREENSHOT)))
    print(f"page reached the ledger {reached_s * 1000:.0f} ms after it settled; "
          f"restock shown after {restock_shown_s * 1000:.0f} ms")
