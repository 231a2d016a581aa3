"""Concurrency limits with real worker processes (issue #15): four `prorch worker` processes on
one store, a pipeline class with max_running = 2 whose hook takes 0.3 s. From the hooks' own
clocks, never more than 2 run at any instant, and 2 do run together (the limit is not a lock
that serialises them); another class without a limit is not held back. SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest

from prorch import Orchestrator, RegistrationError
from prorch.registry import Registry, isolated_registry
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of

PRORCH = str(Path(sys.executable).parent / "prorch")
APP = """
    import os
    import time
    from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step

    @register_step
    class Render(OnStartMixin, Step):
        name = "Render"

        def on_start(self):
            started = time.time()
            time.sleep(0.3)
            self.finish({"start": started, "end": time.time(), "pid": os.getpid()})

    @register_pipeline
    class Limited(Pipeline):
        name = "Limited"
        steps = [Render]
        max_running = 2

    @register_pipeline
    class Free(Pipeline):
        name = "Free"
        steps = [Render]
"""


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_max_running_holds_across_four_workers(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path / 'limits.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    (tmp_path / "render.py").write_text(textwrap.dedent(APP))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    env["PYTHONPATH"] = str(tmp_path)
    sys.path.insert(0, str(tmp_path))
    with isolated_registry() as registry:
        import render  # noqa: F401 - registers Limited and Free here, to create them

        limited = [registry.pipeline("Limited").create(url, {}).uuid for _ in range(12)]
        free = [registry.pipeline("Free").create(url, {}).uuid for _ in range(8)]
    sys.modules.pop("render", None)
    sys.path.remove(str(tmp_path))
    command = [PRORCH, "-r", url, "--app", "render", "worker", "--interval", "0.05", "--batch-size", "1"]
    workers = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    try:
        orchestrator = Orchestrator(url)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if all(orchestrator.store.get_pipeline(u).status.value == "finished" for u in limited + free):  # type: ignore[union-attr]
                break
            time.sleep(0.2)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        logs = [worker.communicate(timeout=30)[1] for worker in workers]
    outputs = {u: orchestrator.get(u).steps[0].output for u in limited + free}
    assert all(outputs.values()), logs
    limited_runs = [(outputs[u]["start"], outputs[u]["end"]) for u in limited]
    assert most_at_once(limited_runs) == 2
    assert len({outputs[u]["pid"] for u in limited}) >= 2  # several workers took part
    everything = limited_runs + [(outputs[u]["start"], outputs[u]["end"]) for u in free]
    assert most_at_once(everything) > 2  # the free ones were not held back by the limit


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgresql", "tinydb"])
def test_the_claim_leaves_room_only_up_to_the_limit(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    step = step_of("Slow", None, lambda self: None)
    limited, free = pipeline_of(step, name="Limited", max_running=2), pipeline_of(step, name="Free")
    for _ in range(4):
        limited.create(backend, {})
        free.create(backend, {})
    orchestrator = Orchestrator(backend, registry=registry)
    now = orchestrator.clock.now()
    later = now + timedelta(seconds=60)
    first = orchestrator.store.claim_due(now, "w1", later, 100, {"Limited": 2})
    second = orchestrator.store.claim_due(now, "w2", later, 100, {"Limited": 2})
    assert sorted(p.name for p in first) == ["Free"] * 4 + ["Limited"] * 2 and second == []
    expired = now + timedelta(seconds=61)  # the leases ran out: room again, for 2
    third = orchestrator.store.claim_due(expired, "w3", expired + timedelta(seconds=60), 100, {"Limited": 2})
    assert sorted(p.name for p in third) == ["Free"] * 4 + ["Limited"] * 2


def test_a_bad_limit_is_refused_at_registration(registry: Registry) -> None:
    with pytest.raises(RegistrationError, match="max_running must be a whole number of 1 or more, got 0"):
        pipeline_of(step_of("S", lambda self: None), name="Zero", max_running=0)


def test_a_repository_without_claims_still_keeps_to_the_limit_in_one_pass(
    tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend("seed", tmp_path, request)  # the 1.0.1 README's repository: no claim, one process
    step = step_of("Slow", None, lambda self: None)
    limited, free = pipeline_of(step, name="Limited", max_running=2), pipeline_of(step, name="Free")
    for _ in range(3):
        limited.create(backend, {})
        free.create(backend, {})
    orchestrator = Orchestrator(backend, registry=registry)
    now = orchestrator.clock.now()
    found = orchestrator.store.claim_due(now, "w1", now + timedelta(seconds=60), 100, {"Limited": 2})
    assert sorted(p.name for p in found) == ["Free"] * 3 + ["Limited"] * 2
