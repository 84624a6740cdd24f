"""Two headless Chromiums chat through ``dsys lb``; a chat server is SIGKILLed under one
of them; both keep chatting and miss nothing.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and
selenium; skipped with the reason when they are absent, unless
``DSYS_REQUIRE_BROWSER=1`` (CI), which makes their absence a failure.
``DSYS_CHAT_SCREENSHOT=PATH`` keeps a screenshot there (docs/img/chat.png is one).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from examples.chat.cluster import ChatCluster

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ROOM = "browsers"

pytestmark = pytest.mark.timeout(120)


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser_factory() -> Iterator[Callable[[], Any]]:
    reason = _missing()
    if reason is not None:
        if os.environ.get("DSYS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DSYS_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers: list[Any] = []
    dirs: list[str] = []

    def make() -> Any:
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        profile = tempfile.mkdtemp(prefix="dsys-chromium-")
        dirs.append(profile)
        for flag in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--window-size=1100,680", f"--user-data-dir={profile}",
        ):  # fmt: skip
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        driver.set_script_timeout(10)
        drivers.append(driver)
        return driver

    try:
        yield make
    finally:
        for d in drivers:
            d.quit()
        for profile in dirs:
            shutil.rmtree(profile, ignore_errors=True)


def _wait(cond: Callable[[], Any], limit: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + limit
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {limit} s")
        time.sleep(0.1)


def _sign_up(driver: Any, url: str, user: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    driver.find_element(By.ID, "user").send_keys(user)
    driver.find_element(By.ID, "password").send_keys("browser password")
    driver.find_element(By.ID, "signup").click()
    _wait(lambda: driver.execute_script("return window.chatState.ready"), what=f"{user} online")


def _enter_room(driver: Any, room: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "new-room").send_keys(room)
    driver.find_element(By.ID, "create").click()
    _wait(
        lambda: driver.execute_script("return window.chatState.current") == room,
        what=f"in room {room}",
    )


def _say(driver: Any, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "text")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def _log(driver: Any) -> list[tuple[int, str]]:
    """What the page shows: (offset, text) of every stored message in the room's list."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#messages li:not(.pending)')]"
        ".map(li => [Number(li.dataset.offset), li.querySelector('.text').textContent])"
    )
    return [(int(o), str(t)) for o, t in rows]


def _ticks(driver: Any) -> list[str]:
    """The delivery marks of the page's own stored messages (✓ stored, ✓✓ delivered)."""
    return list(
        driver.execute_script(
            "return [...document.querySelectorAll('#messages li:not(.pending) .tick')]"
            ".map(t => t.textContent)"
        )
    )


def _unacked(driver: Any) -> int:
    return int(driver.execute_script("return window.chatState.unacked.size"))


def test_two_browsers_chat_through_a_killed_server(
    cluster: ChatCluster, browser_factory: Callable[[], Any]
) -> None:
    ann, ben = browser_factory(), browser_factory()
    _sign_up(ann, cluster.url, "ann")
    _sign_up(ben, cluster.url, "ben")
    _enter_room(ann, ROOM)
    _enter_room(ben, ROOM)  # it exists: the page joins it instead
    sent: list[str] = []
    for i in range(3):
        for who, driver in (("ann", ann), ("ben", ben)):
            text = f"{who} says hello {i}"
            _say(driver, text)
            sent.append(text)
            _wait(lambda d=driver: _unacked(d) == 0, what="ack")  # type: ignore[misc]
    # delivery receipts: each page's own messages turn ✓✓ once the other page got them
    for driver in (ann, ben):
        _wait(lambda d=driver: _ticks(d) == ["✓✓"] * 3, what="delivered")  # type: ignore[misc]
    victim = ann.execute_script("return window.chatState.server")
    cluster.kill(victim)
    for i in range(3):
        for who, driver in (("ann", ann), ("ben", ben)):
            text = f"{who} after the crash {i}"
            _say(driver, text)
            sent.append(text)
    for driver in (ann, ben):
        _wait(lambda d=driver: _unacked(d) == 0, 40, "every post acknowledged")  # type: ignore[misc]
        _wait(lambda d=driver: len(_log(d)) == len(sent), 20, "every message shown")  # type: ignore[misc]
    assert ann.execute_script("return window.chatState.server") != victim
    for driver in (ann, ben):
        log = _log(driver)
        assert [o for o, _ in log] == list(range(1, len(sent) + 1))  # in order, no gap
        texts = [t for _, t in log]
        assert sorted(texts) == sorted(sent)  # nothing missing, nothing twice
        for who in ("ann", "ben"):
            assert [t for t in texts if t.startswith(who)] == [s for s in sent if s.startswith(who)]
    assert _log(ann) == _log(ben)
    # typing shows on the other page; presence lists both
    from selenium.webdriver.common.by import By

    ben.find_element(By.ID, "text").send_keys("typing")
    _wait(lambda: "ben is typing" in ann.find_element(By.ID, "typing").text, what="typing")
    _wait(
        lambda: len(ann.find_elements(By.CSS_SELECTOR, "#members li.online")) == 2, what="presence"
    )
    shot = os.environ.get("DSYS_CHAT_SCREENSHOT")
    if shot:
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        ann.save_screenshot(shot)
    cluster.restart(victim)
