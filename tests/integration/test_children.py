"""Child pipelines and results (issue #15): a hook starts children (idempotently, when it runs
again), a child's end wakes its waiting parent at once, the parent reads their results, a
failed child raises a clear error, cancelling a parent cancels its children, and
``Orchestrator.wait`` returns a result, on the memory store and on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from prorch import (
    FakeClock,
    InvalidOutputError,
    Orchestrator,
    PipelineFailedError,
    StepUsageError,
    WaitTimeoutError,
)
from prorch.model.registry import Registry
from prorch.storage.creation import create_pipelines
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of


def resize(step: Any) -> None:
    if step.params["size"] == 0:
        step.fail("size zero")
        return
    step.finish({"px": step.params["size"] * 2})


def fan_out(step: Any) -> None:
    if "boom" in step.params and step.attempt == 1:
        step.metadata["first"] = step.start_child("Thumb", {"size": 1}, key="1")
        raise RuntimeError("crashed after starting a child")
    step.metadata["kids"] = [step.start_child("Thumb", {"size": s}, key=str(s)) for s in step.params["sizes"]]


def fan_in(step: Any) -> None:
    results = [step.child_result(kid) for kid in step.metadata["kids"]]
    if None in results:
        step.wait(seconds=86400)  # a day: only the children's ends wake it sooner
        return
    step.finish({"px": [r["px"] for r in results]})


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def orchestrator(request: pytest.FixtureRequest, tmp_path: Path, registry: Registry) -> Any:
    pipeline_of(step_of("Resize", resize), name="Thumb")
    pipeline_of(step_of("Fan", fan_out, fan_in, max_attempts=2, retry_delay=0), name="Gallery")
    backend = make_backend(request.param, tmp_path, request)
    yield Orchestrator(backend, registry=registry, clock=FakeClock())
    if hasattr(backend, "dispose"):
        backend.dispose()


def test_children_wake_their_parent_and_give_their_results(orchestrator: Orchestrator) -> None:
    gallery = orchestrator.registry.pipeline("Gallery").create(
        orchestrator.store.backend, {"sizes": [1, 2, 3]}, clock=orchestrator.clock, tenant="acme"
    )
    orchestrator.execute_pipelines()  # the parent starts 3 children and waits a day
    state = orchestrator.get(gallery.uuid)
    assert [c.status.value for c in state.children] == ["pending"] * 3
    assert {c.parent_uuid for c in state.children} == {gallery.uuid}
    assert {c.context.get("tenant") for c in state.children} == {"acme"}
    orchestrator.execute_pipelines()  # the children finish; their ends wake the parent
    parent = orchestrator.get(gallery.uuid).pipeline
    assert parent.next_run_at is not None and parent.next_run_at <= orchestrator.clock.now()  # no day passed
    orchestrator.execute_pipelines()
    assert orchestrator.result(gallery.uuid) == {"px": [2, 4, 6]}
    assert orchestrator.wait(gallery.uuid, timeout=1) == {"px": [2, 4, 6]}
    unread = [m for m in orchestrator.store.messages_of(gallery.uuid) if m.consumed_at is None]
    assert unread == []  # child_result read each child's wake-up


def test_a_hook_that_runs_again_gets_the_same_child(orchestrator: Orchestrator) -> None:
    gallery = orchestrator.registry.pipeline("Gallery").create(
        orchestrator.store.backend, {"sizes": [1], "boom": True}, clock=orchestrator.clock
    )
    orchestrator.execute_pipelines()  # attempt 1 starts child "1", then raises
    orchestrator.execute_pipelines()  # attempt 2 starts child "1" again
    children = orchestrator.get(gallery.uuid).children
    assert len(children) == 1


def test_a_failed_child_is_a_clear_error_in_its_parent(orchestrator: Orchestrator) -> None:
    gallery = orchestrator.registry.pipeline("Gallery").create(
        orchestrator.store.backend, {"sizes": [0]}, clock=orchestrator.clock
    )
    for _ in range(4):
        orchestrator.execute_pipelines()
    state = orchestrator.get(gallery.uuid)
    child = state.children[0]
    assert child.status.value == "failed"
    assert state.pipeline.status.value == "failed"
    assert state.steps[0].error is not None and state.steps[0].error.type == "PipelineFailedError"
    assert f"pipeline {child.uuid} (Thumb) failed: size zero" in state.steps[0].error.message
    with pytest.raises(PipelineFailedError, match="failed") as caught:
        orchestrator.wait(gallery.uuid, timeout=1)
    assert caught.value.status == "failed"


def test_cancelling_a_parent_cancels_its_children(orchestrator: Orchestrator) -> None:
    gallery = orchestrator.registry.pipeline("Gallery").create(
        orchestrator.store.backend, {"sizes": [1, 2]}, clock=orchestrator.clock
    )
    orchestrator.execute_pipelines()
    orchestrator.cancel(gallery.uuid)
    assert [c.status.value for c in orchestrator.get(gallery.uuid).children] == ["cancelled", "cancelled"]
    with pytest.raises(PipelineFailedError, match="cancelled"):
        orchestrator.result(gallery.uuid)


def test_cancel_children_off_keeps_them(registry: Registry, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    pipeline_of(step_of("Resize", resize), name="Thumb")
    pipeline_of(step_of("Fan", fan_out, fan_in), name="Gallery", cancel_children=False)
    orchestrator = Orchestrator(make_backend("memory", tmp_path, request), registry=registry, clock=FakeClock())
    gallery = registry.pipeline("Gallery").create(orchestrator.store.backend, {"sizes": [1]}, clock=orchestrator.clock)
    orchestrator.execute_pipelines()
    orchestrator.cancel(gallery.uuid)
    assert [c.status.value for c in orchestrator.get(gallery.uuid).children] == ["pending"]


def test_results_follow_the_pipelines_output_model(
    registry: Registry, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    class Size(BaseModel):
        px: int

    good = pipeline_of(step_of("Good", lambda self: self.finish({"px": "7"})), name="Good", Output=Size)
    bad = pipeline_of(step_of("Bad", lambda self: self.finish({"width": 7})), name="Bad", Output=Size)
    orchestrator = Orchestrator(make_backend("memory", tmp_path, request), registry=registry, clock=FakeClock())
    first = good.create(orchestrator.store.backend, {}, clock=orchestrator.clock)
    second = bad.create(orchestrator.store.backend, {}, clock=orchestrator.clock)
    assert orchestrator.result(first.uuid) is None  # not ended yet
    with pytest.raises(WaitTimeoutError, match=r"did not end within 0\.05s"):
        orchestrator.wait(first.uuid, timeout=0.05)
    orchestrator.execute_pipelines()
    assert orchestrator.result(first.uuid) == {"px": 7}
    with pytest.raises(InvalidOutputError, match=r"does not match Bad\.Output"):
        orchestrator.result(second.uuid)


def test_child_result_of_a_stranger_is_refused(
    registry: Registry, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    stranger = pipeline_of(step_of("Lone", lambda self: None), name="Lone")
    pipeline_of(step_of("Nosy", lambda self: self.child_result(self.params["other"])), name="Nosy")
    orchestrator = Orchestrator(make_backend("memory", tmp_path, request), registry=registry, clock=FakeClock())
    other = stranger.create(orchestrator.store.backend, {}, clock=orchestrator.clock)
    nosy = registry.pipeline("Nosy").create(orchestrator.store.backend, {"other": other.uuid}, clock=orchestrator.clock)
    orchestrator.execute_pipelines()
    error = orchestrator.get(nosy.uuid).steps[0].error
    assert error is not None and error.type == StepUsageError.__name__
    assert "no child of this pipeline has that uuid" in error.message


def test_cancelling_the_root_of_a_deep_chain_cancels_every_descendant(
    registry: Registry, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Issue #25: each child's cancel ran inside its parent's, so a chain deeper than Python's
    recursion limit stopped half-way with a RecursionError (logged), leaving the rest running."""
    link = pipeline_of(step_of("Hold", lambda self: self.wait(seconds=86400)), name="Link")
    orchestrator = Orchestrator(make_backend("sqlite", tmp_path, request), registry=registry, clock=FakeClock())
    store, clock = orchestrator.store, orchestrator.clock
    ((root, _),) = create_pipelines(store, link, [{}], [None], registry=registry, clock=clock)
    parent = root
    for _ in range(600):  # deeper than the recursion limit (1,000 frames) allows a nested cancel to go
        ((parent, _),) = create_pipelines(store, link, [{}], [None], registry=registry, clock=clock,
                                          parent_uuid=parent.uuid)  # fmt: skip
    orchestrator.cancel(root.uuid)
    statuses = [p.status.value for p in store.all_pipelines()]
    assert len(statuses) == 601 and set(statuses) == {"cancelled"}


class CountingReads:
    """Counts the reads of a real backend's messages repository and the rows they return."""

    READS = ("search", "unread_messages", "last_sent_at", "has_unread_messages")

    def __init__(self, repository: Any) -> None:
        self.calls = 0
        self.rows = 0
        for name in self.READS:
            if hasattr(repository, name):
                setattr(repository, name, self._counted(getattr(repository, name)))

    def _counted(self, read: Any) -> Any:
        def counted(*args: Any) -> Any:
            found = read(*args)
            self.calls += 1
            self.rows += len(found) if isinstance(found, list) else 1
            return found

        return counted


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_parent_reads_its_childrens_ends_in_linear_time(
    kind: str, registry: Registry, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Issue #25: every child's end and every ``child_result`` read all the parent's messages
    (quadratic: 7.1 s per ``on_continue`` with 1,000 children). Now each reads only unread
    messages of its name, by an index: the rows read grow with the number of children."""
    n = 90  # within one pass's batch (100)
    pipeline_of(step_of("Resize", resize), name="Thumb")
    pipeline_of(step_of("Fan", fan_out, fan_in), name="Gallery")
    orchestrator = Orchestrator(make_backend(kind, tmp_path, request), registry=registry, clock=FakeClock())
    reads = CountingReads(orchestrator.store.messages)
    gallery = registry.pipeline("Gallery").create(
        orchestrator.store.backend, {"sizes": list(range(1, n + 1))}, clock=orchestrator.clock
    )
    orchestrator.execute_pipelines()  # the parent starts its children
    orchestrator.execute_pipelines()  # they finish: n messages sent to the parent
    before = reads.rows
    orchestrator.execute_pipelines()  # the parent reads n results (n child_result calls)
    assert orchestrator.result(gallery.uuid) == {"px": [2 * s for s in range(1, n + 1)]}
    assert reads.rows - before <= 2 * n  # quadratic: n * n
    assert reads.rows <= 5 * n  # sending included (each send read every earlier message)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_draining_messages_reads_each_about_once(
    kind: str, registry: Registry, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    n = 300
    drained: list[Any] = []

    def drain(step: Any) -> None:
        while (payload := step.receive("job")) is not None:
            drained.append(payload)
        step.finish(len(drained))

    inbox = pipeline_of(step_of("Drain", on_start=lambda self: self.wait(seconds=86400), on_continue=drain),
                        name="Inbox")  # fmt: skip
    orchestrator = Orchestrator(make_backend(kind, tmp_path, request), registry=registry, clock=FakeClock())
    reads = CountingReads(orchestrator.store.messages)
    run = inbox.create(orchestrator.store.backend, {}, clock=orchestrator.clock)
    orchestrator.execute_pipelines()
    for i in range(n):
        orchestrator.send(run.uuid, "job" if i % 3 else "other", i)
    calls = reads.calls
    orchestrator.execute_pipelines()
    assert drained == [i for i in range(n) if i % 3]  # oldest first, each once
    assert reads.rows <= 3 * n  # quadratic: every receive read all n messages
    assert reads.calls - calls <= len(drained) // 10 + 5  # reads by pages, not one per message


def test_a_paused_child_holds_its_parent_until_it_is_resumed(orchestrator: Orchestrator) -> None:
    """Pause x children (#29 item 3): the parent waits for a paused child as for any child."""
    orchestrator.pause(name="Thumb", reason="thumbnails later")
    gallery = orchestrator.registry.pipeline("Gallery").create(
        orchestrator.store.backend, {"sizes": [1, 2]}, clock=orchestrator.clock
    )
    for _ in range(3):
        orchestrator.execute_pipelines()
    state = orchestrator.get(gallery.uuid)
    assert state.pipeline.status.value == "pending" and [c.status.value for c in state.children] == ["pending"] * 2
    assert {p.uuid for p in orchestrator.query(state="paused").pipelines} == {c.uuid for c in state.children}
    assert orchestrator.query(state="waiting").pipelines[0].uuid == gallery.uuid
    orchestrator.resume(name="Thumb")
    for _ in range(3):
        orchestrator.execute_pipelines()
    assert orchestrator.result(gallery.uuid) == {"px": [2, 4]}
