"""The storefront in a real headless Chromium: browse, add to cart, pay, watch delivery.

Needs Debian's ``chromium`` and ``chromium-driver``; skipped when they are absent unless
``DSYS_REQUIRE_BROWSER=1`` (CI sets it). ``DSYS_SHOP_SCREENSHOT=PATH`` also saves the
final page there (``docs/img/shop.png`` was made that way).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from examples.shop.run import Shop

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        reason = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("DSYS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DSYS_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="dsys-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={profile}", "--window-size=1200,800",
    ):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_browse_add_to_cart_pay_and_see_the_order_delivered(shop: Shop, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(shop.url + "/")
    browser.find_element(By.ID, "user").send_keys(f"browser{os.getpid()}")
    browser.find_element(By.ID, "password").send_keys("correct horse battery")
    browser.find_element(By.ID, "signup").click()
    wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".product")))
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".product h3")]
    assert "Mug" in names and "Watch" in names
    browser.find_element(By.CSS_SELECTOR, "button.add[data-id='mug']").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".cart-item[data-id='mug']")))
    browser.find_element(By.CSS_SELECTOR, "button.add[data-id='sunglasses']").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "li[data-id='sunglasses']")))
    wait.until(ec.element_to_be_clickable((By.ID, "checkout"))).click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "checkout-msg"), "placed"))
    wait.until(ec.text_to_be_present_in_element((By.ID, "live"), "live"))
    delivered = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "li.order.delivered")))
    assert "Mug" in delivered.text and "Sunglasses" in delivered.text
    assert browser.find_elements(By.CSS_SELECTOR, ".cart-item") == []
    if target := os.environ.get("DSYS_SHOP_SCREENSHOT"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(target)
