"""A real `prorch worker --metrics-port` (issue #16): /metrics serves the Prometheus text format
with transitions, hook failures, retries, hook and pass durations, start lag and the store's
gauges, labelled by pipeline and step only; /healthz is 200 while the loop and the heartbeat run,
however long a hook takes (issue #27: it was 503 once a hook held the loop past 3 x the interval);
hooks in flight, free slots and hooks overdue past their timeout are gauges."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.postgres import free_port

pytest.importorskip("prometheus_client")
PRORCH = str(Path(sys.executable).parent / "prorch")
APP = """
import time
from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step

@register_step
class Quick(OnStartMixin, Step):
    name = "Quick"

    def on_start(self):
        if self.params.get("flaky") and self.attempt == 1:
            raise RuntimeError("first try fails")
        if self.params.get("hang"):
            time.sleep(self.params["hang"])

@register_pipeline
class Job(Pipeline):
    name = "Job"
    steps = [Quick]

@register_step
class Flaky(Quick):
    name = "Flaky"
    max_attempts = 2
    retry_delay = 0.1

@register_pipeline
class FlakyJob(Pipeline):
    name = "FlakyJob"
    steps = [Flaky]

@register_step
class Overdue(Quick):
    name = "Overdue"
    timeout = 0.5
    max_attempts = 1

@register_pipeline
class OverdueJob(Pipeline):
    name = "OverdueJob"
    steps = [Overdue]
"""


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in:\n{text}")


def test_metrics_and_health_of_a_real_worker(tmp_path: Path) -> None:
    (tmp_path / "jobs.py").write_text(APP)
    (tmp_path / "prorch.toml").write_text('repository = "sqlite:///jobs.db"\napp = ["jobs"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}

    def cli(*args: str) -> str:
        done = subprocess.run([PRORCH, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    for _ in range(3):
        cli("start", "Job")
    cli("start", "FlakyJob", "-p", "flaky=true")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    worker = subprocess.Popen(
        [PRORCH, "worker", "--interval", "0.2", "--metrics-port", str(port), "--concurrency", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline:
            try:
                status, text = fetch(base + "/metrics")
            except OSError:
                time.sleep(0.1)
                continue
            finished = 'prorch_pipelines{pipeline="FlakyJob",status="finished"} 1.0' in text
            # the worker observes a pass's duration once per interval: wait for two of them too
            passes = "prorch_pass_duration_seconds_count" in text and value(text, "prorch_pass_duration_seconds_count")
            if finished and passes >= 2:
                break
            time.sleep(0.3)
        assert status == 200
        # pipeline-level transitions in their own family, with no empty step label (#31)
        assert value(text, 'prorch_pipeline_transitions_total{kind="pipeline.finished",pipeline="Job"}') == 3
        assert 'step=""' not in text
        assert value(text, 'prorch_transitions_total{kind="step.finished",pipeline="Job",step="Quick"}') == 3
        assert value(text, 'prorch_retries_total{pipeline="FlakyJob",step="Flaky"}') == 1
        assert value(text, 'prorch_hook_failures_total{pipeline="FlakyJob",step="Flaky"}') == 1
        assert value(text, 'prorch_hook_duration_seconds_count{hook="on_start",pipeline="Job",step="Quick"}') == 3
        assert value(text, "prorch_pass_duration_seconds_count") >= 2
        assert value(text, "prorch_start_lag_seconds_count") >= 4
        assert value(text, 'prorch_pipelines{pipeline="Job",status="finished"}') == 3
        assert value(text, "prorch_pipelines_due") == 0 and value(text, "prorch_pipelines_running") == 0
        assert value(text, "prorch_due") == 0  # the old name, deprecated, kept one release
        assert "# HELP prorch_due Deprecated: use prorch_pipelines_due" in text
        assert "_created" not in text  # prometheus_client's _created series doubled the output
        build = next(line for line in text.splitlines() if line.startswith("prorch_build_info{"))
        assert f'python="{sys.version_info.major}.{sys.version_info.minor}.' in build and 'version="' in build
        assert "uuid" not in text  # labels stay bounded: never a pipeline's uuid
        status, body = fetch(base + "/healthz")
        assert status == 200 and body.startswith("ok")

        cli("start", "Job", "-p", "hang=2")  # one hook holds the loop for 2 s > 3 x 0.2 s
        seen = healthy_while(base, "prorch_hooks_in_flight 1.0", seconds=15)
        assert "prorch_free_slots 0.0" in seen  # concurrency 1, one hook running
        healthy_while(base, "prorch_hooks_in_flight 0.0", seconds=15)  # ...and through the whole hook
        cli("start", "OverdueJob", "-p", "hang=2")  # runs past its 0.5 s timeout: reported, not unhealthy
        healthy_while(base, "prorch_hooks_overdue 1.0", seconds=15)
        healthy_while(base, "prorch_hooks_overdue 0.0", seconds=15)
        assert fetch(base + "/nothing")[0] == 404
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)


def healthy_while(base: str, sample: str, seconds: float) -> str:
    """Poll /healthz and /metrics until the metrics show ``sample``; every /healthz must be 200."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, body = fetch(base + "/healthz")
        assert status == 200 and body.startswith("ok: heartbeat"), body
        text = fetch(base + "/metrics")[1]
        if sample in text.splitlines():
            return text
        time.sleep(0.1)
    raise AssertionError(f"{sample} not seen in {seconds}s")
