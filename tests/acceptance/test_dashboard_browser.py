"""The dashboard in a real browser (Debian's Chromium, driven by playwright): a real
`prorch dashboard` process and a real `prorch worker` over one SQLite store. Screenshots are
saved as artifacts (``$PRORCH_ARTIFACTS``, default ``build/screenshots``); docs/dashboard.md
shows the ones a run made."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

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
    slow = prorch(
        workdir, "start", "Order", "-p", "item=slowpoke", "-p", "qty=7", "--tenant", "acme", "--attr", "customer=acme"
    ).strip()
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
        page.fill("input[name=param]", "")
        page.fill("input[name=attributes]", "customer=acme")  # search attributes (#29)
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
        assert page.locator("#attributes").inner_text().strip() == "customer=acme"
        logs = page.locator("[data-step=Ship] .step-logs")  # what on_continue logged with self.log
        assert "logs of attempt 1" in logs.locator("summary").inner_text()
        assert "INFO    no ship_now yet for slowpoke" in logs.locator("pre.logs").inner_text()
        page.screenshot(path=str(ARTIFACTS / "pipeline.png"), full_page=True)

        # before logging in: the buttons are shown as unavailable, with why
        assert (
            page.locator("#cancel").is_disabled() and page.locator("#cancel").get_attribute("title") == "log in to act"
        )
        assert page.locator("#status").inner_text() == "pending"

        # log in with the token, cancel, confirm with a reason: the pipeline is cancelled
        page.click("text=Log in")
        page.fill("input[name=token]", TOKEN)
        page.click("#login")

        # pause its tenant (asked first, with a reason), see what holds it, resume the tenant
        page.click("#pause-tenant")
        assert "Pause the tenant acme" in page.locator("#confirm-box").inner_text()
        page.fill("#reason", "acme migrates")
        page.screenshot(path=str(ARTIFACTS / "pause-tenant-confirm.png"), full_page=True)
        page.click("#confirm")
        page.wait_for_selector("#paused")
        assert "tenant acme" in page.locator("#paused").inner_text()
        assert "acme migrates" in page.locator("#paused").inner_text()
        page.screenshot(path=str(ARTIFACTS / "tenant-paused.png"), full_page=True)
        page.click("#resume")
        page.click("#confirm")
        page.wait_for_selector("#pause-tenant")
        assert page.locator("#paused").count() == 0

        page.click("#cancel")
        assert "Cancel pipeline" in page.locator("#confirm-box").inner_text()
        page.fill("#reason", "customer called")
        page.click("#confirm")
        page.wait_for_selector("#status:has-text('cancelled')")
        assert "customer called" in page.locator("table.history").inner_text()
        assert "cancelled" in page.locator(".notice").inner_text()
        page.screenshot(path=str(ARTIFACTS / "cancelled.png"), full_page=True)
        browser.close()
    assert prorch(workdir, "show", slow, "--json").count('"status": "cancelled"') >= 1


SHOTS = Path(os.environ.get("PRORCH_DASH_SHOTS", "/tmp/dash-shots"))


def shoot(page: Any, name: str) -> None:
    for folder in (ARTIFACTS, SHOTS):
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / name), full_page=True)


def test_an_operator_searches_reruns_and_bulk_retries(tmp_path: Path) -> None:
    """Three orders fail at Charge (the card is declined); the operator finds one by its key,
    reads its timeline, reruns it from Charge with another quantity once the card works, then
    retries the other failed ones at once, confirming each, and sees the earlier errors kept."""
    chromium = chromium_or_skip()
    workdir = shop_workdir(tmp_path)
    decline = tmp_path / "decline"
    decline.touch()
    orders = [prorch(workdir, "start", "Order", "-p", f"item=book{n}", "--key", f"order-{n}").strip() for n in range(3)]
    with (
        running(workdir, "worker", "--interval", "0.2", SHOP_DECLINE_FILE=str(decline)),
        dashboard(workdir, token=TOKEN) as (base, _),
        playwright.sync_playwright() as driver,
    ):
        browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(base + "/pipelines?status=failed")
        page.wait_for_function("document.querySelector('#total').textContent.startsWith('3 matching')", timeout=30_000)
        assert page.locator("#bulk-review").is_disabled()  # logged out
        page.click("text=log in to act")
        page.fill("input[name=token]", TOKEN)
        page.click("#login")

        # search by key from the header: the pipeline's page, with its timeline
        page.fill("#search", "order-1")
        page.click("#search-go")
        page.wait_for_url(f"**/pipelines/{orders[1]}")
        assert page.locator("#gantt rect[data-outcome=failed][data-step=Charge]").count() == 1
        assert page.locator("#gantt rect[data-outcome=finished][data-step=Reserve]").count() == 1
        shoot(page, "pipeline-failed.png")

        # rerun from Charge with another quantity, once the card works
        decline.unlink()
        assert page.locator("#from-step").input_value() == "Charge"  # the failed step, chosen already
        params = json.loads(page.locator("#rerun-params").input_value())
        page.fill("#rerun-params", json.dumps({**params, "qty": 5}))
        page.click("#rerun")
        assert page.locator("#confirm-step").inner_text() == "Charge"
        assert json.loads(page.locator("#confirm-params").inner_text())["qty"] == 5
        page.fill("#reason", "card replaced")
        shoot(page, "rerun-confirm.png")
        page.click("#confirm")
        page.wait_for_selector("#forked-from")
        assert page.locator("#forked-from").inner_text() == orders[1]
        page.wait_for_selector("#status:has-text('finished')", timeout=30_000)
        assert page.locator("#gantt rect[data-outcome=reused][data-step=Reserve]").count() == 1
        # it ended while the page was open: what only a live pipeline offers is gone
        assert not page.locator("#cancel").is_visible() and not page.locator("#cancel-original").is_visible()
        assert page.locator("#rerun").is_visible()
        shoot(page, "rerun-new.png")
        page.click("#forked-from")
        assert page.locator(".rerun-as a").count() == 1 and "card replaced" in page.locator(".rerun-as").inner_text()

        # bulk retry of every failed order: a dry run with the count, a confirmation, a summary
        page.goto(base + "/pipelines?status=failed")
        page.select_option("#bulk-action", "retry")
        shoot(page, "pipelines-bulk.png")
        page.click("#bulk-review")
        assert page.locator("#matched").inner_text() == "3" and page.locator("#done-count").inner_text() == "3"
        assert page.locator("#bulk-summary").get_attribute("data-dry-run") == "true"
        page.fill("#reason", "bank is back")
        shoot(page, "bulk-confirm.png")
        page.click("#bulk-confirm")
        assert page.locator("#bulk-summary").get_attribute("data-dry-run") == "false"
        assert page.locator("#done-count").inner_text() == "3" and page.locator("#failed").inner_text().startswith("0")
        shoot(page, "bulk-done.png")

        # the retried pipelines finish; the error of the attempt before stays visible
        page.goto(f"{base}/pipelines/{orders[0]}")
        page.wait_for_selector("#status:has-text('finished')", timeout=30_000)
        assert page.locator("#gantt rect[data-step=Charge]").count() == 2  # failed, then finished
        page.click("details.earlier summary")
        earlier = page.locator("details.earlier").inner_text()
        assert "card declined" in earlier and "bank is back" in earlier
        shoot(page, "retried-earlier-attempts.png")

        # a search that finds nothing says so
        page.fill("#search", "order-404")
        page.click("#search-go")
        assert "no pipeline has the uuid or key 'order-404'" in page.locator("#error").inner_text()
        assert page.locator("#search").input_value() == "order-404"  # kept, to correct it
        shoot(page, "search-not-found.png")
        browser.close()


def test_an_operator_lists_pipelines_by_state_and_reads_versions(tmp_path: Path) -> None:
    """From the overview's waiting card to the list filtered by state (pending splits into
    running, due and waiting: issue #29), then another state from the form; the Versions page
    from the header, with what ``prorch versions`` prints (issue #30)."""
    chromium = chromium_or_skip()
    workdir = shop_workdir(tmp_path)
    for n in range(2):
        prorch(workdir, "start", "Order", "-p", f"item=book{n}")
    slow = prorch(workdir, "start", "Order", "-p", "item=slowpoke", "--tenant", "acme").strip()
    prorch(workdir, "run")  # the books finish; the slowpoke waits for its word (an hour)
    due = prorch(workdir, "start", "Order", "-p", "item=later").strip()  # no worker runs it: due
    with dashboard(workdir) as (base, _), playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 700})
        page.goto(base + "/")
        assert page.locator("[data-kind=waiting] .count").inner_text() == "1"
        assert page.locator("[data-kind=due] .count").inner_text() == "1"
        page.click("[data-kind=waiting]")
        page.wait_for_url("**/pipelines?state=waiting")
        assert page.locator("select[name=state]").input_value() == "waiting"
        assert page.locator("#total").inner_text().startswith("1 matching")
        row = page.locator("#pipelines tbody tr")
        assert row.count() == 1 and row.get_attribute("data-uuid") == slow
        assert row.locator(".badge").inner_text() == "pending · waiting"
        shoot(page, "pipelines-waiting.png")

        page.select_option("select[name=state]", "due")
        page.click("button[type=submit]")
        assert page.locator("#pipelines tbody tr").get_attribute("data-uuid") == due
        assert page.locator("#pipelines tbody tr .badge").inner_text() == "pending · due"
        page.click(f"tr[data-uuid='{due}'] a")
        assert page.locator("#status").inner_text() == "pending" and page.locator("#state").inner_text() == "due"

        page.click("header nav >> text=Versions")
        page.wait_for_url("**/versions")
        order = page.locator("tr[data-version='Order v1']")
        assert order.locator("td.live").inner_text() == "2" and order.locator("td.code").inner_text() == "yes"
        assert "Code you can delete" not in page.content()  # both live ones predate nothing to delete
        shoot(page, "versions.png")
        browser.close()


def test_an_operator_pauses_a_pipeline_and_resumes_it(tmp_path: Path) -> None:
    """Pause… on a pipeline's page asks to confirm, with a reason; the page then says which pause
    holds it and offers Resume…; the overview's paused card counts it and leads to the list of
    paused pipelines (issue #29 item 3)."""
    chromium = chromium_or_skip()
    workdir = shop_workdir(tmp_path)
    due = prorch(workdir, "start", "Order", "-p", "item=later").strip()  # no worker runs it: due
    with dashboard(workdir, token=TOKEN) as (base, _), playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(f"{base}/pipelines/{due}")
        assert page.locator("#pause").is_disabled() and page.locator("#pause").get_attribute("title") == "log in to act"
        page.click("text=Log in")
        page.fill("input[name=token]", TOKEN)
        page.click("#login")
        page.click("#pause")
        assert "no worker claims it until it is resumed" in page.locator("#confirm-box").inner_text()
        page.fill("#reason", "waiting for stock")
        page.click("#confirm")
        page.wait_for_selector("#state:has-text('paused')")
        assert "by dashboard (127.0.0.1): waiting for stock" in page.locator("#paused").inner_text()
        assert page.locator("#resume").is_enabled() and page.locator("#pause").count() == 0
        assert "due now" not in page.locator("#next-run").inner_text()
        shoot(page, "pipeline-paused.png")

        page.goto(base + "/")
        assert page.locator("[data-kind=paused] .count").inner_text() == "1"
        assert page.locator("[data-kind=due] .count").inner_text() == "0"
        page.click("[data-kind=paused]")
        page.wait_for_url("**/pipelines?state=paused")
        row = page.locator("#pipelines tbody tr")
        assert row.get_attribute("data-uuid") == due and row.locator(".badge").inner_text() == "pending · paused"
        assert "waiting for stock" in row.locator(".held").inner_text()
        shoot(page, "pipelines-paused.png")

        page.click(f"tr[data-uuid='{due}'] a")
        page.click("#resume")
        page.click("#confirm")
        page.wait_for_selector("#state:has-text('due')")
        assert page.locator("#pause").is_enabled() and page.locator("#paused").count() == 0
        browser.close()
    assert '"pipeline.resumed"' in prorch(workdir, "show", due, "--json")
