"""Schedules with real worker processes (issue #15): three `prorch worker` processes on one
store, a schedule every second, catch_up = "all": every tick in the window gets exactly one
pipeline, none is missed, and no worker reports an error, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from prorch import Orchestrator
from prorch.model.registry import isolated_registry

PRORCH = str(Path(sys.executable).parent / "prorch")
APP = """
    import os
    from datetime import timedelta
    from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step

    @register_step
    class Beat(OnStartMixin, Step):
        name = "Beat"

        def on_start(self):
            self.finish({"worker": os.getpid()})

    @register_pipeline
    class Heartbeat(Pipeline):
        name = "Heartbeat"
        steps = [Beat]
        every = timedelta(seconds=1)
        catch_up = "all"
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_three_workers_create_exactly_one_pipeline_per_tick(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'beats.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    (tmp_path / "beats.py").write_text(textwrap.dedent(APP))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    Orchestrator(url).store.get_pipeline("warm-up")  # create the schema once, before the race
    command = [PRORCH, "-r", url, "--app", "beats", "worker", "--interval", "0.1"]
    workers = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    with isolated_registry():
        deadline = time.monotonic() + 60  # a loaded machine: wait for the workers to start
        while not Orchestrator(url).query(name="Heartbeat", limit=1).pipelines and time.monotonic() < deadline:
            time.sleep(0.2)
    time.sleep(5)
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    logs = [worker.communicate(timeout=30)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0, 0], logs
    for log in logs:
        assert "Traceback" not in log and "ERROR" not in log and "KeyConflict" not in log, log

    with isolated_registry():
        pipelines = Orchestrator(url).query(name="Heartbeat", limit=1000).pipelines
    ticks = sorted(datetime.fromisoformat(p.context["schedule_tick"]) for p in pipelines)
    assert len(ticks) >= 4
    assert len(set(ticks)) == len(ticks) == len(pipelines)  # one pipeline per tick
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(ticks))  # and none missed
    assert {p.key for p in pipelines} == {f"schedule:Heartbeat:{t.isoformat()}" for t in ticks}
    assert {p.status.value for p in pipelines} <= {"finished", "pending"}


BROKEN_APP = """
    from datetime import timedelta
    from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step

    @register_step
    class Work(OnStartMixin, Step):
        name = "Work"

        def on_start(self):
            self.finish({"done": True})

    @register_pipeline
    class Jobs(Pipeline):
        name = "Jobs"
        steps = [Work]

    def params_of(tick):
        raise RuntimeError("the params service is down")

    @register_pipeline
    class Broken(Pipeline):
        name = "Broken"
        steps = [Work]
        every = timedelta(seconds=1)
        schedule_params = params_of
"""


@pytest.mark.slow
def test_a_worker_whose_schedule_params_raise_goes_on_running_pipelines(tmp_path: Path) -> None:
    """Regression (#25 items 4 and 15): a schedule_params that raised killed the pass, so every
    worker with that code exited 1 and no pipeline ran; `prorch run` reported errors 0 for
    refused params. Now the schedule is an error of each pass and everything else goes on."""
    url = f"sqlite:///{tmp_path / 'broken.db'}"
    (tmp_path / "broken.py").write_text(textwrap.dedent(BROKEN_APP))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    command = [PRORCH, "-r", url, "--app", "broken"]
    once = subprocess.run([*command, "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert once.returncode == 1, once  # an error of the pass, as for any other pass error
    assert "errors 1" in once.stdout
    assert "error schedule:Broken: RuntimeError: the params service is down" in once.stdout
    assert "Traceback" not in once.stderr  # one clear line without --verbose
    worker = subprocess.Popen(
        [*command, "worker", "--interval", "0.1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with isolated_registry():
        start = subprocess.run(
            [*command, "start", "Jobs"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert start.returncode == 0, start
        orchestrator = Orchestrator(url)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            jobs = orchestrator.query(name="Jobs").pipelines
            if jobs and jobs[0].status.value == "finished":
                break
            time.sleep(0.1)
        time.sleep(1)  # a few more passes, each failing on the schedule
        alive = worker.poll() is None
        worker.send_signal(signal.SIGTERM)
        _, log = worker.communicate(timeout=30)
        assert alive and worker.returncode == 0, log
        assert [job.status.value for job in orchestrator.query(name="Jobs").pipelines] == ["finished"], log
        assert orchestrator.query(name="Broken").pipelines == []
    assert log.count("schedule of Broken failed: the params service is down") >= 2, log
