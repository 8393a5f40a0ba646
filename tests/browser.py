"""Headless Chromium for the chat page tests (Debian's chromium + chromium-driver, which .ci/run
installs): skipped without it, except under CI=true, where its absence is an error."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 30


def need_chromium(module_level: bool = False) -> None:
    """Skip (the test, or the whole module) where Chromium is missing; under CI it must be there."""
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"CI needs {CHROMIUM} and {CHROMEDRIVER}: .ci/run installs chromium and chromium-driver")
    pytest.skip("no Chromium: apt-get install chromium chromium-driver to run the browser test",
                allow_module_level=module_level)


@contextmanager
def chromium(profile: Path):
    """A headless Chromium driven by Selenium, quit on exit; its console is kept for get_log."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for get_log
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver, condition, what: str):
    """Wait up to WAIT seconds for condition(driver) to be truthy; returns it."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT).until(lambda d: condition(d), message=what)
