"""Find (or install) Debian's headless Chromium and its driver for the dashboard's browser tests.

The tests drive ``/usr/bin/chromium`` through ``/usr/bin/chromedriver`` with Selenium, given
both paths so that Selenium Manager never downloads a browser. When either is missing and we
run as root, Debian's ``chromium`` and ``chromium-driver`` packages are installed with apt-get
(as scripts/postgres.py installs PostgreSQL); otherwise a clear error says how to get them.

CLI::

    python -m scripts.browser          # prints the two paths (installing them when root)
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from scripts._testing import nodekit

log = logging.getLogger(__name__)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PACKAGES = ("chromium", "chromium-driver")
HOW_TO_GET_ONE = (
    "install them with `sudo apt-get install chromium chromium-driver` (Debian/Ubuntu), or "
    "point AIO_WORKQ_CHROMIUM and AIO_WORKQ_CHROMEDRIVER at a matching pair"
)


class BrowserError(RuntimeError):
    """Chromium or its driver is missing and could not be installed."""


@dataclass(frozen=True, slots=True)
class Browser:
    """The browser binary and the driver that speaks to it."""

    chromium: Path
    chromedriver: Path


def find() -> Browser | None:
    """The installed pair (``AIO_WORKQ_CHROMIUM`` / ``AIO_WORKQ_CHROMEDRIVER`` first), or None."""
    chromium = Path(os.environ.get("AIO_WORKQ_CHROMIUM") or CHROMIUM)
    driver = Path(os.environ.get("AIO_WORKQ_CHROMEDRIVER") or CHROMEDRIVER)
    if chromium.exists() and driver.exists():
        return Browser(chromium, driver)
    return None


def ensure_installed() -> Browser:
    """The pair, installing Debian's packages first when missing (only as root).

    Raises:
        BrowserError: missing, and not root or apt-get failed.
    """
    found = find()
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BrowserError(f"Chromium or chromedriver is missing ({CHROMIUM}, {CHROMEDRIVER}): "
                           f"{HOW_TO_GET_ONE}")  # fmt: skip
    for package in PACKAGES:
        log.warning("%s is missing: installing it with apt-get", package)
        failed = nodekit.apt_install(package)
        if failed is not None:
            raise BrowserError(f"`{failed}` failed: {HOW_TO_GET_ONE}")
    found = find()
    if found is None:
        raise BrowserError(
            f"the packages were installed but {CHROMIUM} or {CHROMEDRIVER} is missing"
        )
    return found


def main() -> int:
    try:
        browser = ensure_installed()
    except BrowserError as exc:
        print(f"scripts.browser: {exc}", file=sys.stderr)
        return 1
    print(f"chromium: {browser.chromium}\nchromedriver: {browser.chromedriver}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
