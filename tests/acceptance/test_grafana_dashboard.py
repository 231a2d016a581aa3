"""The Grafana dashboard that ships in docs/grafana (issue #16), checked against a real
Prometheus server (Debian's) scraping a real `prorch worker --metrics-port` while pipelines
run, fail, retry and time out: Prometheus accepts every panel's query, every panel has data,
and the panels agree with the store. Grafana cannot be installed from this machine's
registries, so tests/support/panels.py draws the panels from Prometheus's answers and Chromium
screenshots them (``$PRORCH_ARTIFACTS``, default build/screenshots; docs/observability.md shows
one)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from prorch import Orchestrator
from prorch.model.registry import isolated_registry
from tests.support.browser import chromium_or_skip, prometheus_or_skip
from tests.support.panels import dashboard_html, panel_series, wait_for_data
from tests.support.postgres import free_port

pytest.importorskip("prometheus_client")
playwright = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "prorch-dashboard.json"
ARTIFACTS = Path(os.environ.get("PRORCH_ARTIFACTS", ROOT / "build" / "screenshots"))
PRORCH = str(Path(sys.executable).parent / "prorch")
APP = """
import time
from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step

@register_step
class Resize(OnStartMixin, Step):
    name = "Resize"

    def on_start(self):
        time.sleep(0.01 * (self.params["n"] % 5))

@register_step
class Upload(OnStartMixin, Step):
    name = "Upload"
    max_attempts = 2
    retry_delay = 0.1

    def on_start(self):
        if self.params["n"] % 4 == 0 and self.attempt == 1:
            raise ConnectionError("the bucket did not answer")

@register_step
class Notify(OnStartMixin, Step):
    name = "Notify"
    timeout = 0.2
    max_attempts = 2
    retry_delay = 0.1

    def on_start(self):
        if self.params["n"] % 10 == 0 and self.attempt == 1:
            time.sleep(0.5)

@register_pipeline
class Thumbnail(Pipeline):
    name = "Thumbnail"
    steps = [Resize, Upload, Notify]
"""
LOAD_SECONDS = 20


def prometheus_config(worker_port: int) -> str:
    return textwrap.dedent(f"""\
        global:
          scrape_interval: 1s
          evaluation_interval: 1s
        scrape_configs:
          - job_name: prorch
            static_configs:
              - targets: ["127.0.0.1:{worker_port}"]
        """)


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_the_grafana_dashboard_against_a_real_prometheus(tmp_path: Path) -> None:
    prometheus_bin, chromium = prometheus_or_skip(), chromium_or_skip()
    dashboard = json.loads(DASHBOARD.read_text())
    url = f"sqlite:///{tmp_path / 'prorch.db'}"
    (tmp_path / "photos.py").write_text(APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    code = os.environ.get("PYTHONPATH")  # the code under test, when a worktree sets it
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), code]) if code else str(tmp_path)
    worker_port, prometheus_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(prometheus_config(worker_port))
    prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    worker_log_path = tmp_path / "worker.log"  # a file, not a pipe: a full pipe would stop the worker mid-log
    with worker_log_path.open("w") as worker_log_file:
        worker = subprocess.Popen(
            [PRORCH, "-r", url, "--app", "photos", "worker", "--interval", "0.2", "--metrics-port", str(worker_port)],
            cwd=tmp_path, env=env, stdout=worker_log_file, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    prometheus = subprocess.Popen(
        [prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    sys.path.insert(0, str(tmp_path))
    try:
        deadline = time.monotonic() + 60
        while not ready(f"{prometheus_url}/-/ready"):
            assert prometheus.poll() is None, prometheus.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "Prometheus did not become ready within 60 s"
            time.sleep(0.2)
        start = time.time()
        with isolated_registry() as registry:
            import photos  # noqa: F401 - registers Thumbnail here, to create pipelines from the test

            thumbnail = registry.pipeline("Thumbnail")
            n = 0
            while time.time() - start < LOAD_SECONDS:  # a steady trickle, with bursts of backlog
                for _ in range(3 if int(time.time() - start) % 6 else 25):
                    thumbnail.create(url, {"n": n})
                    n += 1
                time.sleep(0.5)
        orchestrator = Orchestrator(url)
        while orchestrator.query(status="pending", count=True).total:  # the worker drains the backlog
            assert time.time() - start < LOAD_SECONDS + 60, (
                "the worker did not finish the pipelines: " + worker_log_path.read_text()[-3000:]
            )
            time.sleep(0.5)
        finished = orchestrator.query(status="finished", count=True).total
        assert finished == n
        # the store's gauges are read at most every 5 s: until Prometheus has scraped the final count
        wait_for_data(prometheus_url, f'prorch_pipelines{{status="finished"}} == {finished}', timeout=30)
        time.sleep(2)  # a range's last step can fall just before that scrape: two more
        end = time.time()

        data = {
            panel["id"]: panel_series(prometheus_url, panel, start - 5, end, job="prorch")
            for panel in dashboard["panels"]
        }
        empty = [panel["title"] for panel in dashboard["panels"] if not data[panel["id"]]]
        assert empty == []  # every query is accepted and finds something
        titles = {panel["title"]: data[panel["id"]] for panel in dashboard["panels"]}
        by_status = {s.label: s.points[-1][1] for s in titles["Pipelines by status"]}
        assert by_status["finished"] == finished
        kinds = {s.label for s in titles["Transitions / s by kind"]}
        assert {"step.finished", "step.retrying", "pipeline.finished"} <= kinds
        faults = {s.label for s in titles["Hook failures, retries and timeouts / s"]}
        assert {"failed Thumbnail / Upload", "retried Thumbnail / Upload", "timed out Thumbnail / Notify"} <= faults
        hooks = {s.label for s in titles["Hook duration p95 by step"]}
        assert {"Thumbnail / Resize", "Thumbnail / Upload", "Thumbnail / Notify"} <= hooks
        assert titles["Workers"][0].points[-1][1] == 1

        page_file = tmp_path / "dashboard.html"
        page_file.write_text(dashboard_html(dashboard, data, start - 5, end))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(page_file.as_uri())
            assert page.locator("section.panel").count() == len(dashboard["panels"])
            assert page.locator(".nodata").count() == 0
            assert page.locator("polyline").count() >= 8
            page.screenshot(path=str(ARTIFACTS / "grafana-dashboard.png"), full_page=True)
            browser.close()
    finally:
        sys.modules.pop("photos", None)
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
        for process in (worker, prometheus):
            process.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        worker_log = worker_log_path.read_text()
        prometheus.communicate(timeout=30)
    assert "Traceback" not in worker_log, worker_log[-3000:]
