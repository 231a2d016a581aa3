"""The pass and the orchestrator's operations, on the in-memory backend with a fake clock."""

from __future__ import annotations

import functools
import logging
from datetime import timedelta
from typing import Any

import pytest

from prorch import (
    ConcurrentUpdateError,
    InvalidStateError,
    IRepository,
    OnContinueMixin,
    OnStartMixin,
    Orchestrator,
    OrchestratorConfig,
    PipelineNotFoundError,
    Status,
    Step,
    register_step,
)
from prorch.model.records import JSONDict
from prorch.model.registry import Registry
from prorch.storage.store import Store
from prorch.testing import Harness
from repositories.memory import MemoryBackend
from tests.support import builders
from tests.support.builders import pipeline_of

RAN: list[str] = []
quick = functools.partial(builders.quick, log=RAN, entry="{name}:{pipeline}")


@pytest.fixture(autouse=True)
def _clear() -> None:
    RAN.clear()


def test_unregistered_pipeline_is_blocked_untouched_then_resumes(registry: Registry) -> None:
    backend = MemoryBackend()
    harness = Harness(backend, registry=registry)
    p = pipeline_of(quick("A"), name="Deployed")
    run = harness.create(p)
    del registry.pipelines["Deployed"]  # the code is not deployed on this worker
    before = harness.orchestrator.get(run.uuid).pipeline
    summary = harness.run_pass()
    assert summary.claimed == 0  # a worker never claims what it cannot run (issue #25)
    state = harness.orchestrator.get(run.uuid)
    assert state.pipeline.claims == 0 and state.pipeline.next_run_at == before.next_run_at  # not put off
    assert state.pipeline.status == Status.PENDING
    assert state.steps[0].status == Status.CREATED
    assert state.blocked is not None and "Deployed" in state.blocked
    assert RAN == []
    registry.pipelines["Deployed"] = {1: p}  # deployed again
    assert harness.run_until_done(run.uuid) == "finished"


def test_unregistered_step_version_blocks(registry: Registry) -> None:
    harness = Harness(registry=registry)
    run = harness.create(pipeline_of(quick("A"), name="P"))
    del registry.steps["A"]
    summary = harness.run_pass()
    assert "no step named 'A'" in summary.blocked[run.uuid]
    assert harness.status(run.uuid) == "pending"


def test_steps_are_the_source_of_truth_after_a_crash_between_writes(registry: Registry) -> None:
    harness = Harness(registry=registry)
    run = harness.create(pipeline_of(quick("A"), quick("B"), name="P"))
    # A crash after the step writes but before the pipeline write leaves steps ahead.
    steps = harness.repository("STEP")
    for row in steps.search(["pipeline_uuid", run.uuid]):
        steps.update(row["uuid"], {"status": "finished"})
    summary = harness.run_pass()
    assert summary.finished == 1
    assert harness.status(run.uuid) == "finished"
    assert RAN == []
    assert harness.event_types(run.uuid)[-1] == "pipeline.finished"


def test_higher_priority_is_claimed_first(registry: Registry) -> None:
    harness = Harness(registry=registry, batch_size=1)
    a = quick("A")
    low = harness.create(pipeline_of(a, name="Low"))
    high = harness.create(pipeline_of(quick("B"), priority=10, name="High"))
    override = harness.create(pipeline_of(quick("C"), name="Mid"), priority=5)
    harness.run_pass()
    harness.run_pass()
    harness.run_pass()
    assert [entry.split(":")[1] for entry in RAN] == [high.uuid, override.uuid, low.uuid]


def test_list_get_history(registry: Registry) -> None:
    harness = Harness(registry=registry)
    p = pipeline_of(quick("A"), quick("B"), name="P")
    done = harness.create(p, {"n": 1})
    harness.run_pass()
    fresh = harness.create(p, {"n": 2})
    o = harness.orchestrator
    assert {r.uuid for r in o.list_pipelines()} == {done.uuid, fresh.uuid}
    assert [r.uuid for r in o.list_pipelines(status="finished")] == [done.uuid]
    assert [r.uuid for r in o.list_pipelines(status=Status.PENDING, name="P")] == [fresh.uuid]
    state = o.get(done.uuid)
    assert [s.name for s in state.steps] == ["A", "B"]
    assert state.pipeline.params == {"n": 1}
    history = o.history(done.uuid)
    assert [e.type.value for e in history] == [
        "pipeline.created",
        "pipeline.started",
        "step.started",
        "step.finished",
        "step.started",
        "step.finished",
        "pipeline.finished",
    ]
    assert [e.at for e in history] == sorted(e.at for e in history)
    with pytest.raises(PipelineNotFoundError):
        o.get("nope")
    with pytest.raises(PipelineNotFoundError):
        o.history("nope")


def test_retry_resumes_a_failed_pipeline_from_its_failed_step(registry: Registry) -> None:
    class Once(OnStartMixin, Step):
        name = "Once"

        def on_start(self) -> None:
            RAN.append("once")
            if RAN.count("once") == 1:
                raise RuntimeError("first time fails")

    register_step(Once)
    harness = Harness(registry=registry)
    run = harness.create(pipeline_of(quick("A"), Once, name="P"))
    harness.run_pass()
    assert harness.status(run.uuid) == "failed"
    state = harness.orchestrator.retry(run.uuid)
    assert state.pipeline.status == Status.PENDING
    assert state.steps[1].error is None and state.steps[1].attempt == 0
    assert harness.run_until_done(run.uuid) == "finished"
    assert RAN.count("once") == 2
    assert len([r for r in RAN if r.startswith("A:")]) == 1  # finished steps are not re-run
    assert "pipeline.retried" in harness.event_types(run.uuid)


def test_retry_and_cancel_refuse_the_wrong_status(registry: Registry) -> None:
    harness = Harness(registry=registry)
    run = harness.create(pipeline_of(quick("A"), name="P"))
    with pytest.raises(InvalidStateError, match="only a failed pipeline"):
        harness.orchestrator.retry(run.uuid)
    harness.run_pass()
    with pytest.raises(InvalidStateError, match="already finished"):
        harness.orchestrator.cancel(run.uuid)


def test_seed_form_stores_created_and_runs_only_on_start(registry: Registry) -> None:
    backend = MemoryBackend()
    p = pipeline_of(quick("A"), quick("B"), name="P")
    pipeline = p(repository_class=backend)
    assert pipeline.status == "created"
    orchestrator = Orchestrator(config=OrchestratorConfig(repository_class=backend), registry=registry)
    assert orchestrator.execute_pipelines().claimed == 0  # as in 1.0.1: created is not resumed
    pipeline.start()
    assert pipeline.status == "finished"
    loaded = p(repository_class=backend, pipeline_uuid=pipeline.uuid)
    assert loaded.status == "finished"


def test_a_leased_pipeline_is_not_claimed_by_a_second_orchestrator(registry: Registry) -> None:
    class Slow(OnStartMixin, OnContinueMixin, Step):
        name = "Slow"

        def on_start(self) -> None:
            pass

        def on_continue(self) -> None:
            self.finish()

    register_step(Slow)
    backend = MemoryBackend()
    first = Harness(backend, registry=registry)
    second = Orchestrator(backend, clock=first.clock, registry=registry)
    run = first.create(pipeline_of(Slow, name="P"))
    store = Store(backend)
    claimed = store.claim_due(first.clock.now(), "worker-1", first.clock.now() + timedelta(seconds=60), 10)
    assert [p.uuid for p in claimed] == [run.uuid]
    assert second.execute_pipelines().claimed == 0  # the lease is live
    first.clock.advance(61)
    assert second.execute_pipelines().finished == 1  # expired: picked up by another


def test_a_stale_write_is_refused(registry: Registry) -> None:
    backend = MemoryBackend()
    harness = Harness(backend, registry=registry)
    run = harness.create(pipeline_of(quick("A"), name="P"))
    store = Store(backend)
    mine = store.get_pipeline(run.uuid)
    theirs = store.get_pipeline(run.uuid)
    assert mine is not None and theirs is not None
    store.commit([theirs])
    with pytest.raises(ConcurrentUpdateError, match="changed since it was read"):
        store.commit([mine])


def flaky_steps(poisoned: set[str]) -> type[IRepository]:
    """A four-method repository class whose step searches fail for the pipelines in
    ``poisoned``; its rows live in this call's closure, not in class attributes shared by tests."""
    rows: dict[str, dict[str, JSONDict]] = {}

    class FlakySteps(IRepository):
        def __init__(self, model: str) -> None:
            super().__init__(model)
            self.table = rows.setdefault(model, {})

        def get(self, uuid: str) -> JSONDict | None:
            return self.table.get(uuid)

        def save(self, data: JSONDict) -> None:
            self.table[data["uuid"]] = dict(data)

        def update(self, uuid: str, data: JSONDict) -> None:
            self.table[uuid].update(data)

        def search(self, filter: list[Any]) -> list[JSONDict]:  # noqa: A002
            field, value = filter
            if self.model == "STEP" and value in poisoned:
                raise OSError("disk read error")
            return [dict(r) for r in self.table.values() if r.get(field) == value]

    return FlakySteps


def test_a_repository_error_is_recorded_on_that_pipeline_and_the_pass_goes_on(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    poisoned: set[str] = set()
    harness = Harness(flaky_steps(poisoned), registry=registry)
    p = pipeline_of(quick("A"), name="P")
    bad = harness.create(p)
    good = harness.create(p)
    poisoned.add(bad.uuid)
    with caplog.at_level(logging.WARNING):
        summary = harness.run_pass()
    assert summary.claimed == 2 and summary.finished == 1
    assert "RepositoryError" in summary.errors[bad.uuid] and "disk read error" in summary.errors[bad.uuid]
    assert bad.uuid in caplog.text
    record = harness.orchestrator.store.get_pipeline(bad.uuid)
    assert record is not None and record.status == Status.PENDING
    assert record.last_error is not None and "disk read error" in record.last_error.message
    assert harness.status(good.uuid) == "finished"
    # the seed-style repository cannot guard against a second orchestrator: said once
    assert caplog.text.count("cannot guard against a second one") == 1
    poisoned.clear()
    assert harness.run_until_done(bad.uuid) == "finished"


def test_a_corrupt_record_is_reported_not_fatal(registry: Registry) -> None:
    harness = Harness(registry=registry)
    run = harness.create(pipeline_of(quick("A"), name="P"))
    harness.repository("STEP").update(next(iter(harness.repository.tables["STEP"])), {"status": "exploded"})
    summary = harness.run_pass()
    assert "CorruptRecordError" in summary.errors[run.uuid]
    assert "is not valid" in summary.errors[run.uuid]
