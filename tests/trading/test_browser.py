"""The web page in a real headless Chromium: sign up, place an order, see it fill, see
the portfolio change.

Skipped when Chromium, chromedriver or selenium is missing, unless
``DSYS_REQUIRE_BROWSER=1`` (CI sets it), which makes that a failure.
``DSYS_TRADING_SCREENSHOT=PATH`` saves a screenshot of the page (docs/img/trading.png).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from examples.trading.system import TradingSystem

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"


def _missing() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, DRIVER):
        if not os.path.exists(path):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return ""


@pytest.fixture
def driver() -> Iterator[Any]:
    why = _missing()
    if why:
        if os.environ.get("DSYS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DSYS_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="dsys-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--window-size=1400,900", f"--user-data-dir={profile}",
    ):  # fmt: skip
        opts.add_argument(flag)
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    d.set_page_load_timeout(30)
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_place_an_order_in_the_browser_and_see_the_portfolio_change(
    system: TradingSystem, driver: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(driver, 20)
    driver.get(system.api_url + "/")
    driver.find_element(By.ID, "user").send_keys("browser_user")
    driver.find_element(By.ID, "password").send_keys("s3cret-pass")
    driver.find_element(By.ID, "signup").click()
    wait.until(ec.visibility_of_element_located((By.ID, "app")))
    wait.until(ec.text_to_be_present_in_element((By.ID, "feed"), "live"))
    wait.until(
        lambda d: "%" in d.find_element(By.CSS_SELECTOR, "#watchlist tr td:nth-child(3)").text
    )
    symbol = driver.find_element(By.ID, "symbol").get_attribute("value")
    assert driver.find_element(By.ID, "cash").text == "10,00,000.00"
    Select(driver.find_element(By.ID, "type")).select_by_visible_text("MARKET")
    qty = driver.find_element(By.ID, "qty")
    qty.clear()
    qty.send_keys("7")
    driver.find_element(By.ID, "place").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "order-msg"), "COMPLETE"))
    assert "filled 7/7" in driver.find_element(By.ID, "order-msg").text
    row = (By.CSS_SELECTOR, f'#holdings tr[data-symbol="{symbol}"] td.qty')
    wait.until(ec.text_to_be_present_in_element(row, "7"))
    wait.until(lambda d: d.find_element(By.ID, "cash").text != "10,00,000.00")
    status = driver.find_element(By.CSS_SELECTOR, "#orders tr td.status").text
    assert status == "COMPLETE"
    depth = driver.find_elements(By.CSS_SELECTOR, "#depth tr")
    assert len(depth) == 5
    shot = os.environ.get("DSYS_TRADING_SCREENSHOT")
    if shot:
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(shot)
