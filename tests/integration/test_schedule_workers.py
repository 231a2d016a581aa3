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
from prorch.registry import isolated_registry

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
