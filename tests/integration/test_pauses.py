"""Pause and resume (issue #29 item 3): a paused class (every version or one), tenant or pipeline
is not claimed, on every backend and the four-method repository's fallback; pipelines created
while paused wait too; resuming makes the work due at once; a pipeline's own pause is in its
history with who and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from prorch import FakeClock, InvalidParamsError, Orchestrator, Status
from prorch.model.exceptions import InvalidStateError
from prorch.model.registry import Registry
from prorch.model.status import EventType
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of


def work(step: Any) -> None:
    step.finish({})


@pytest.fixture(params=["memory", "sqlite", "postgresql", "tinydb", "seed", "docs-example"])
def orchestrator(request: pytest.FixtureRequest, tmp_path: Path, registry: Registry) -> Any:
    pipeline_of(step_of("Work", work), name="Job")
    pipeline_of(step_of("Work2", work), name="Job", version=2)
    pipeline_of(step_of("Other", work), name="Other")
    backend = make_backend(request.param, tmp_path, request)
    yield Orchestrator(backend, registry=registry, clock=FakeClock())
    if hasattr(backend, "dispose"):
        backend.dispose()


def create(orchestrator: Orchestrator, name: str, version: int | None = None, tenant: str | None = None) -> str:
    pipeline = orchestrator.registry.pipeline(name, version)
    return pipeline.create(orchestrator.store.backend, {}, clock=orchestrator.clock, tenant=tenant).uuid


def status(orchestrator: Orchestrator, uuid: str) -> Status:
    return orchestrator.get(uuid).pipeline.status


def test_a_paused_class_tenant_or_pipeline_is_not_claimed_until_resumed(orchestrator: Orchestrator) -> None:
    job1, job2, other = create(orchestrator, "Job", 1), create(orchestrator, "Job", 2), create(orchestrator, "Other")
    acme, solo = create(orchestrator, "Other", tenant="acme"), create(orchestrator, "Other")
    orchestrator.pause(name="Job", version=1, actor="alice", reason="bad deploy")
    orchestrator.pause(tenant="acme")
    orchestrator.pause(uuid=solo)
    late = create(orchestrator, "Job", 1)  # created while its class is paused: it waits too

    summary = orchestrator.execute_pipelines()
    assert summary.claimed == 2
    finished = {u for u in (job1, job2, other, acme, solo, late) if status(orchestrator, u) == Status.FINISHED}
    assert finished == {job2, other}
    assert {p.label() for p in orchestrator.pauses()} == {"class Job v1", "tenant acme", f"pipeline {solo}"}
    assert orchestrator.store.due(orchestrator.clock.now(), 10) == []

    resumed = orchestrator.resume(name="Job", version=1)
    assert (resumed.actor, resumed.reason) == ("alice", "bad deploy")
    orchestrator.resume(tenant="acme")
    orchestrator.resume(uuid=solo, actor="bob")
    assert orchestrator.pauses() == []
    assert orchestrator.execute_pipelines().claimed == 4  # due at once: no wait for a timer
    assert all(status(orchestrator, u) == Status.FINISHED for u in (job1, acme, solo, late))

    kinds = (EventType.PIPELINE_PAUSED, EventType.PIPELINE_RESUMED)
    paused, resumed_event = [e for e in orchestrator.history(solo) if e.type in kinds]
    assert paused.type == EventType.PIPELINE_PAUSED and resumed_event.data == {"actor": "bob"}


def test_a_class_paused_in_every_version_and_the_errors(orchestrator: Orchestrator) -> None:
    job1, job2 = create(orchestrator, "Job", 1), create(orchestrator, "Job", 2)
    orchestrator.pause(name="Job")
    assert orchestrator.execute_pipelines().claimed == 0
    with pytest.raises(InvalidStateError, match="paused already"):
        orchestrator.pause(name="Job", reason="again")
    with pytest.raises(InvalidStateError, match="class Job v2 is not paused"):
        orchestrator.resume(name="Job", version=2)
    with pytest.raises(InvalidParamsError, match="exactly one scope"):
        orchestrator.pause(name="Job", tenant="acme")
    with pytest.raises(InvalidParamsError, match="exactly one scope"):
        orchestrator.pause()
    orchestrator.resume(name="Job")
    assert orchestrator.execute_pipelines().claimed == 2
    assert status(orchestrator, job1) == status(orchestrator, job2) == Status.FINISHED
    with pytest.raises(InvalidStateError, match="nothing to pause"):
        orchestrator.pause(uuid=job1)
