"""The dashboard in a real browser (Debian's Chromium, driven by playwright): a real
`prorch dashboard` process and a real `prorch worker` over one SQLite store. Screenshots are
saved as artifacts (``$PRORCH_ARTIFACTS``, default ``build/screenshots``); docs/dashboard.md
shows the ones a run made."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.support.browser import chromium_or_skip
from tests.support.dashboard import dashboard, prorch, running, shop_workdir

playwright = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("PRORCH_ARTIFACTS", ROOT / "build" / "screenshots"))
TOKEN = "browser-s3cret"


def test_an_operator_watches_filters_and_cancels(tmp_path: Path) -> None:
    chromium = chromium_or_skip()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    workdir = shop_workdir(tmp_path)
    for n in range(4):
        prorch(workdir, "start", "Order", "-p", f"item=book{n}", "-p", f"qty={n + 1}")
    slow = prorch(workdir, "start", "Order", "-p", "item=slowpoke", "-p", "qty=7", "--tenant", "acme").strip()
    with (
        running(workdir, "worker", "--interval", "0.2"),
        dashboard(workdir, token=TOKEN) as (base, _),
        playwright.sync_playwright() as driver,
    ):
        browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})

        # the overview: counts by status, once the worker has run the pipelines
        page.goto(base + "/")
        page.wait_for_function(
            "document.querySelector('[data-status=finished] .count').textContent.trim() === '4'", timeout=30_000
        )  # the page refreshes itself (htmx) while the worker runs
        assert page.locator("[data-status=pending] .count").inner_text() == "1"
        assert page.locator("[data-kind=waiting] .count").inner_text() == "1"
        assert page.locator("svg.chart rect").count() >= 1
        page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)

        # the list, filtered by status from the overview, then by a param in the form
        page.click("[data-status=finished]")
        assert page.locator("#total").inner_text().startswith("4 matching")
        assert page.locator("#pipelines tbody tr").count() == 4
        page.select_option("select[name=status]", "")
        page.fill("input[name=param]", "qty=7")
        page.click("button[type=submit]")
        assert page.locator("#total").inner_text().startswith("1 matching")
        assert page.locator("#pipelines tbody tr").get_attribute("data-uuid") == slow
        page.screenshot(path=str(ARTIFACTS / "pipelines.png"), full_page=True)

        # one pipeline: its steps as a timeline, with the progress its hook reported
        page.click(f"tr[data-uuid='{slow}'] a")
        assert page.locator("[data-step=Ship] .badge").inner_text() == "pending"
        assert "1/4 (25%)" in page.locator("[data-step=Ship] .progress").inner_text()
        assert "in transit" in page.locator("[data-step=Ship] .progress").inner_text()
        assert re.search(r"waiting", page.locator("#next-run").inner_text())
        page.screenshot(path=str(ARTIFACTS / "pipeline.png"), full_page=True)

        # cancel before logging in: refused, nothing changes
        page.click("#cancel")
        assert "log in with the dashboard token" in page.locator("#error").inner_text()
        page.goto(f"{base}/pipelines/{slow}")
        assert page.locator("#status").inner_text() == "pending"

        # log in with the token, cancel: the pipeline is cancelled
        page.click("text=Log in")
        page.fill("input[name=token]", TOKEN)
        page.click("#login")
        page.click("#cancel")
        page.wait_for_selector("#status:has-text('cancelled')")
        assert "cancelled" in page.locator(".notice").inner_text()
        page.screenshot(path=str(ARTIFACTS / "cancelled.png"), full_page=True)
        browser.close()
    assert prorch(workdir, "show", slow, "--json").count('"status": "cancelled"') >= 1
