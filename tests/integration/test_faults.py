"""Repository faults: injected failures, and a PostgreSQL restart in the middle of a run."""

from __future__ import annotations

import collections
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from prorch import (
    OnContinueMixin,
    OnStartMixin,
    Orchestrator,
    Pipeline,
    RepositoryError,
    Status,
    Step,
    register_step,
)
from prorch.model.registry import Registry
from prorch.testing import Harness
from repositories import from_url
from repositories.memory import MemoryBackend
from tests.support.builders import pipeline_of
from tests.support.faults import FaultyBackend
from tests.support.postgres import PostgresServer

RUNS: collections.Counter[str] = collections.Counter()


def declare(registry: Registry) -> type[Pipeline]:
    class Quick(OnStartMixin, Step):
        name = "Quick"

        def on_start(self) -> None:
            RUNS[self.idempotency_key] += 1

    class Poll(OnStartMixin, OnContinueMixin, Step):
        name = "Poll"

        def on_start(self) -> None:
            self.metadata["n"] = 0

        def on_continue(self) -> None:
            self.metadata["n"] += 1
            if self.metadata["n"] >= 2:
                self.finish()
            else:
                self.wait(seconds=1)

    class Last(OnStartMixin, Step):
        name = "Last"

        def on_start(self) -> None:
            time.sleep(0.002)

    for step in (Quick, Poll, Last):
        register_step(step)
    return pipeline_of(Quick, Poll, Last, name="Faulty")


def assert_all_finished_once(orchestrator: Orchestrator, uuids: list[str]) -> None:
    for uuid in uuids:
        state = orchestrator.get(uuid)
        assert state.pipeline.status == Status.FINISHED, (uuid, state.pipeline)
        finishes = collections.Counter(
            e.step_uuid for e in orchestrator.history(uuid) if e.type.value == "step.finished"
        )
        assert finishes == {s.uuid: 1 for s in state.steps}


def test_injected_faults_lose_nothing_and_are_recorded(registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    RUNS.clear()
    inner = MemoryBackend()
    faulty = FaultyBackend(inner, rate=0.15)
    harness = Harness(faulty, registry=registry, lease_seconds=10, max_crashes=20)
    pipeline = declare(registry)
    faulty.enabled = False  # creating is not under test here
    uuids = [harness.create(pipeline).uuid for _ in range(40)]
    faulty.enabled = True
    errors = 0
    pending = True
    for _ in range(3000):
        try:
            errors += len(harness.run_pass().errors)
        except RepositoryError:
            errors += 1  # the claim itself failed: the whole pass is retried
        harness.clock.advance(2)
        faulty.enabled = False
        pending = any(p.status != Status.FINISHED for p in harness.orchestrator.list_pipelines())
        faulty.enabled = True
        if not pending:
            break
    faulty.enabled = False
    assert not pending
    assert faulty.faults > 20 and errors > 0
    assert "injected fault" in caplog.text
    assert_all_finished_once(Orchestrator(inner, registry=registry), uuids)
    assert sum(RUNS.values()) >= 40  # at least once each; a fault after a hook re-runs it


def test_postgresql_restart_mid_run(registry: Registry, postgres_server: PostgresServer, postgres_url: str) -> None:
    pipeline = declare(registry)
    backend = from_url(postgres_url)
    uuids = [pipeline.create(backend).uuid for _ in range(300)]
    worker = Orchestrator(backend, registry=registry, lease_seconds=3, concurrency=4, batch_size=20)
    thread = threading.Thread(target=worker.run_forever, kwargs={"interval": 0.05})
    thread.start()
    try:
        time.sleep(0.5)
        done_before = len(worker.list_pipelines(status="finished"))
        postgres_server.restart()  # pg_ctl restart -m fast, while the worker runs
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and worker.list_pipelines(status="pending"):
            time.sleep(0.2)
    finally:
        worker.stop()
        thread.join(timeout=30)
    assert done_before < len(uuids), "the run finished before the restart: nothing was tested"
    assert_all_finished_once(worker, uuids)


def _create_one(url: str, pipeline: type[Pipeline], results: multiprocessing.Queue[str]) -> None:
    """In a forked child: create one pipeline and report its uuid, or the error."""
    try:
        results.put(pipeline.create(url).uuid)
    except Exception as exc:
        results.put(f"error: {type(exc).__name__}: {exc}")


def test_processes_forked_after_a_create_each_create_their_own_pipeline(registry: Registry, tmp_path: Path) -> None:
    """The parent created a pipeline (made uuids) before forking, as with gunicorn's preload:
    two children creating a pipeline each must not reuse the parent's next uuids."""
    pipeline = declare(registry)
    url = f"sqlite:///{tmp_path / 'forked.db'}"
    first = pipeline.create(url).uuid
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[str] = context.Queue()
    children = [context.Process(target=_create_one, args=(url, pipeline, results)) for _ in range(2)]
    for child in children:
        child.start()
    made = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
    assert not [m for m in made if m.startswith("error")], made
    orchestrator = Orchestrator(url, registry=registry)
    assert {p.uuid for p in orchestrator.list_pipelines()} == {first, *made}
    uuids = [s.uuid for uuid in (first, *made) for s in orchestrator.get(uuid).steps]
    uuids += [e.uuid for uuid in (first, *made) for e in orchestrator.history(uuid)]
    assert len(set(uuids)) == len(uuids) == 3 * 3 + 3
