"""Debian's chromium, headless, driven by selenium through chromedriver: the real browser the
pages mlxlocal makes (serve's chat page, a run's report) are tested in.

Outside CI a machine without chromium skips with the reason; in CI (env CI set) it fails. The
driver talks to chromedriver over loopback, so a module using `browser` also imports
`serving.loopback_only` as its `no_network` fixture.
"""

from __future__ import annotations

import os

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 180  # seconds: a hang guard for loaded machines, not a timing assertion


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless chromium as root (no sandbox) with a private profile; never a driver download.
    Its console (`driver.get_log("browser")`) is kept at every level."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        reason = (
            f"{' and '.join(missing)} not found: the page tests need Debian's chromium and "
            "chromedriver (apt-get install -y chromium chromium-driver; .ci/run installs them)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1200,800",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
    ):
        options.add_argument(flag)
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(log)), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()
