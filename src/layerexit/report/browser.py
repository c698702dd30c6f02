"""Open a report page in headless Chromium (Playwright driving the system's browser).

Used by the browser test and by ``scripts/report_screenshot.py``. Playwright is only the driver:
its own browser download is never used (``executable_path`` points at the installed Chromium, by
default ``chromium`` on the PATH or ``$LAYEREXIT_CHROMIUM``). The page is opened from a file with
every network request refused and recorded, so a page that needs the network shows it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str | None:
    """The Chromium to drive: ``$LAYEREXIT_CHROMIUM``, else chromium (or chromium-browser) on the PATH."""
    given = os.environ.get("LAYEREXIT_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Opened:
    """A page loaded in the browser, with what went wrong while it ran."""

    page: Any  # playwright.sync_api.Page
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    network: list[str] = field(default_factory=list)  # URLs the page tried to fetch (all refused)

    @property
    def problems(self) -> list[str]:
        return (
            [f"console error: {m}" for m in self.console_errors]
            + [f"uncaught exception: {m}" for m in self.page_errors]
            + [f"network request: {u}" for u in self.network]
        )


@contextmanager
def open_page(path: Path, *, width: int = 1400, height: int = 900, timeout_ms: int = 60_000) -> Iterator[Opened]:
    """Load ``path`` in a fresh headless Chromium (new profile in a temporary folder) and yield it."""
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (install it, or set LAYEREXIT_CHROMIUM)")
    with tempfile.TemporaryDirectory(prefix="layerexit-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
        )
        try:
            opened = Opened(context.pages[0] if context.pages else context.new_page())
            page = opened.page
            page.set_default_timeout(timeout_ms)
            page.on("console", lambda m: opened.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: opened.page_errors.append(str(e)))

            def refuse(route: Any) -> None:
                url = route.request.url
                if url.startswith(("file:", "data:", "blob:", "about:")):
                    route.continue_()
                else:
                    opened.network.append(url)
                    route.abort()

            context.route("**/*", refuse)
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            yield opened
        finally:
            context.close()
