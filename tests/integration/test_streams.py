"""Streams (issue #30, item 4): ``self.emit(value)`` appends to the pipeline's stream with the
hook's transition, all or nothing with it; ``Orchestrator.stream`` reads the entries in order,
resumes after a cursor and, following, ends when the pipeline ends; retention removes them with
their pipeline. Real SQLite and TinyDB files, the real PostgreSQL server, the in-memory store and
a user's four-method repository (the seed adapter's fallback)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from prorch import FakeClock, Orchestrator, StepUsageError
from prorch.model.registry import Registry
from prorch.model.streams import MAX_ENTRY_BYTES
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of

KINDS = ["sqlite", "postgresql", "memory", "tinydb", "seed"]


def counting(self: Any) -> None:
    """Emits three entries per hook call, waits twice, then finishes."""
    turn = self.metadata.setdefault("turn", 0)
    for index in range(3):
        self.emit({"turn": turn, "i": index})
    self.metadata["turn"] = turn + 1
    if turn < 2:
        self.wait(60)
    else:
        self.finish()


def values(entries: Any) -> list[Any]:
    return [entry.value for entry in entries]


@pytest.mark.parametrize("kind", KINDS)
def test_entries_come_in_order_and_resume_after_a_cursor(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    job = pipeline_of(step_of("Count", counting, counting), step_of("Tail", lambda s: s.emit("done")), name="Job")
    uuid = job.create(backend, {}).uuid
    other = job.create(backend, {}).uuid
    clock = FakeClock()
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    orchestrator.execute_pipelines()
    first = list(orchestrator.stream(uuid, follow=False))
    assert values(first) == [{"turn": 0, "i": 0}, {"turn": 0, "i": 1}, {"turn": 0, "i": 2}]
    for _ in range(3):
        clock.advance(61)
        orchestrator.execute_pipelines()
    assert orchestrator.get(uuid).pipeline.status.value == "finished"
    entries = list(orchestrator.stream(uuid))  # follows, and ends: the pipeline has ended
    assert [entry.seq for entry in entries] == list(range(1, 11))
    assert values(entries) == [{"turn": t, "i": i} for t in range(3) for i in range(3)] + ["done"]
    assert all(entry.pipeline_uuid == uuid for entry in entries)
    assert values(orchestrator.stream(uuid, after=first[-1].seq)) == values(entries[3:])
    assert list(orchestrator.stream(uuid, after=10)) == []
    assert [e.seq for e in orchestrator.stream(other)] == list(range(1, 11))  # each pipeline its own


@pytest.mark.parametrize("kind", KINDS)
def test_a_hook_that_raises_stores_no_entry(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)

    def flaky(self: Any) -> None:
        self.emit(f"attempt {self.attempt}")
        if self.attempt < 3:
            raise RuntimeError("flake")
        self.finish()

    uuid = pipeline_of(step_of("Flaky", flaky, max_attempts=3, retry_delay=1), name="Job").create(backend, {}).uuid
    clock = FakeClock()
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    for _ in range(3):
        orchestrator.execute_pipelines()
        assert values(orchestrator.stream(uuid, follow=False)) in ([], ["attempt 3"])
        clock.advance(60)
    entries = list(orchestrator.stream(uuid))
    assert [(e.seq, e.value) for e in entries] == [(1, "attempt 3")]


def test_a_bad_value_fails_the_attempt_with_one_clear_error(tmp_path: Path, registry: Registry) -> None:
    url = f"sqlite:///{tmp_path / 'bad.db'}"

    def bad(self: Any) -> None:
        self.emit("kept?")
        self.emit({"when": object()})

    def big(self: Any) -> None:
        self.emit("x" * MAX_ENTRY_BYTES)

    orchestrator = Orchestrator(url, registry=registry)
    first = pipeline_of(step_of("Bad", bad), name="Bad").create(url, {}).uuid
    second = pipeline_of(step_of("Big", big), name="Big").create(url, {}).uuid
    orchestrator.execute_pipelines()
    for uuid, expected in ((first, "emit(): value['when']"), (second, "bytes of JSON, more than the")):
        state = orchestrator.get(uuid)
        (step,) = state.steps
        assert state.pipeline.status.value == "failed"
        assert step.error is not None and step.error.type == StepUsageError.__name__
        assert expected in step.error.message
        assert list(orchestrator.stream(uuid)) == []


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "memory", "tinydb"])
def test_retention_removes_the_stream_with_its_pipeline(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    job = pipeline_of(step_of("Once", lambda s: s.emit({"n": 1})), name="Job")
    clock = FakeClock()
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    gone = job.create(backend, {}, clock=clock).uuid
    orchestrator.execute_pipelines()
    clock.advance(2 * 86400)
    kept = job.create(backend, {}, clock=clock).uuid
    orchestrator.execute_pipelines()
    assert orchestrator.store.last_stream_seq(gone) == 1
    assert orchestrator.purge(timedelta(days=1)).pipelines == 1
    assert orchestrator.store.last_stream_seq(gone) == 0
    assert orchestrator.store.stream_entries(gone) == []
    assert values(orchestrator.stream(kept)) == [{"n": 1}]
