"""A real browser for end-to-end tests: Debian's headless Chromium driven by Selenium
through Debian's chromedriver (``apt-get install chromium chromium-driver``; ``.ci/run``
and the Makefile install them as root). Nothing is downloaded: Selenium is given both
binaries, so its driver manager never runs.

Screenshots are test artifacts, kept under ``$MMQ_ARTIFACTS`` (default
``var/artifacts``), one folder per area (``ui/``, ``flower/``), overwritten per run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
CHROMIUM = ("chromium", "chromium-browser")


def artifacts(area: str) -> Path:
    d = Path(os.environ.get("MMQ_ARTIFACTS") or ROOT / "var" / "artifacts") / area
    d.mkdir(parents=True, exist_ok=True)
    return d


def chrome(width: int = 1280, height: int = 900, *, javascript: bool = True):
    """A headless Chromium session (``javascript=False``: with scripts off, as some
    readers browse); the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    driver = shutil.which("chromedriver")
    if not binary or not driver:  # not a skip: CI installs them (tests/conftest.py)
        pytest.fail("browser tests need Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver)")
    opts = Options()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox",  # root in CI: no user namespace sandbox
                "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--password-store=basic", "--lang=en-US",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    if not javascript:
        opts.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2})
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver))


def screenshot(driver, area: str, name: str) -> Path:
    """The whole page (not only the window), as a PNG under artifacts(area)."""
    path = artifacts(area) / f"{name}.png"
    height = driver.execute_script(
        "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
    size = driver.get_window_size()
    driver.set_window_size(size["width"], max(size["height"], min(int(height) + 120, 4000)))
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(size["width"], size["height"])
    return path
