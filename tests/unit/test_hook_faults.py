"""Faults inside hooks, in one process: results that cannot be stored, BaseException, params a hook
changes, outside writes while a hook runs, stale lease tokens, hook time bounds."""

from __future__ import annotations

import math
import threading
import time
from datetime import timedelta
from typing import Any

import pytest

from prorch import Orchestrator, Status, Step
from prorch.engine import STORE_ATTEMPTS
from prorch.model.exceptions import ConcurrentUpdateError, UnstorableValueError
from prorch.model.jsonvalue import check_json
from prorch.model.registry import Registry
from prorch.storage.store import Store
from prorch.testing import Harness
from repositories.memory import MemoryBackend, MemoryRepository
from tests.support.builders import pipeline_of, step_of

CALLS: list[Any] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    CALLS.clear()


# --- the JSON-value check ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a": float("nan")}, r"\['a'\]: nan is not a JSON number"),
        ({"a": [1, math.inf]}, r"\['a'\]\[1\]: inf is not a JSON number"),
        ({"a": "x\x00y"}, r"\['a'\]: a string with a NUL character"),
        ({1: "a"}, "key 1 is a int; JSON object keys must be str"),
        ({"a": b"raw"}, r"\['a'\]: bytes is not a JSON value"),
        ({"a": {1, 2}}, r"\['a'\]: set is not a JSON value \(use a list\)"),
        ({"a": (1, 2)}, r"\['a'\]: tuple is not a JSON value \(use a list\)"),
        ({"a": object()}, r"\['a'\]: object is not a JSON value"),
    ],
)
def test_check_json_refuses_what_would_not_come_back_unchanged(value: Any, message: str) -> None:
    with pytest.raises(UnstorableValueError, match=message):
        check_json(value, "metadata")


def test_check_json_accepts_json_and_limits_depth() -> None:
    check_json({"a": [1, 2.5, "s", True, None, {"b": []}]}, "x")
    deep: Any = []
    for _ in range(150):
        deep = [deep]
    with pytest.raises(UnstorableValueError, match="nested deeper than 100 levels"):
        check_json(deep, "params")


def test_unstorable_metadata_is_a_failed_attempt_not_an_endless_loop(harness: Harness, registry: Registry) -> None:
    """Regression: a hook leaving bytes in metadata made the pipeline due again forever."""

    def on_start(self: Step) -> None:
        CALLS.append(self.attempt)
        self.metadata["blob"] = b"\x01"

    run = harness.create(pipeline_of(step_of("Blob", on_start, max_attempts=3, retry_delay=1)))
    assert harness.run_until_done(run.uuid, max_passes=20) == "failed"
    assert CALLS == [1, 2, 3]
    step = harness.orchestrator.get(run.uuid).steps[0]
    assert step.error is not None and "metadata['blob']: bytes is not a JSON value" in step.error.message
    assert step.metadata == {}  # nothing of the refused results was stored
    assert harness.event_types(run.uuid).count("step.retrying") == 2


class RefusingRepository(MemoryRepository):
    """Refuses to store a step whose metadata says so, as a database refuses a value it cannot
    hold: the write fails after the hook has run."""

    def compare_and_set(self, uuid: str, expected_revision: int, data: dict[str, Any]) -> bool:
        if self.model == "STEP" and data.get("metadata", {}).get("refuse"):
            raise ValueError("value too long for type character varying(10)")
        return super().compare_and_set(uuid, expected_revision, data)


class RefusingBackend(MemoryBackend):
    def __call__(self, model: str) -> MemoryRepository:
        with self.lock:
            if model not in self._tables:
                self._tables[model] = RefusingRepository(model, self)
            return self._tables[model]


def test_a_store_error_after_a_hook_is_retried_with_backoff_and_counted(registry: Registry) -> None:
    harness = Harness(RefusingBackend(), registry=registry)

    def on_start(self: Step) -> None:
        CALLS.append(self.attempt)
        self.metadata["refuse"] = True

    run = harness.create(pipeline_of(step_of("Refused", on_start)))
    assert harness.run_until_done(run.uuid, max_passes=50) == "failed"
    assert list(range(1, STORE_ATTEMPTS + 1)) == CALLS  # counted, then given up: never endless
    state = harness.orchestrator.get(run.uuid)
    assert state.steps[0].error is not None and "could not be stored" in state.steps[0].error.message
    assert "value too long" in state.steps[0].error.message
    assert state.pipeline.crashes == 0 and state.pipeline.lease_owner is None


# --- BaseException --------------------------------------------------------------------------------


def test_system_exit_in_a_hook_is_a_step_failure_retried_per_policy(harness: Harness, registry: Registry) -> None:
    def on_start(self: Step) -> None:
        CALLS.append(self.attempt)
        if self.attempt == 1:
            raise SystemExit(3)

    run = harness.create(pipeline_of(step_of("Exits", on_start, max_attempts=2)))
    assert harness.run_until_done(run.uuid) == "finished"
    assert CALLS == [1, 2]
    retrying = [e for e in harness.history(run.uuid) if e.type.value == "step.retrying"]
    assert len(retrying) == 1 and retrying[0].data["error"] == "3"


def test_keyboard_interrupt_in_a_hook_stops_the_worker_and_releases_without_blame(
    harness: Harness, registry: Registry
) -> None:
    def on_start(self: Step) -> None:
        CALLS.append("start")
        if CALLS.count("start") == 1:
            raise KeyboardInterrupt

    run = harness.create(pipeline_of(step_of("Interrupted", on_start)))
    harness.clock.advance(1)  # claimed after the first one
    other = harness.create(pipeline_of(step_of("Other", lambda self: CALLS.append("other")), name="Q"))
    harness.orchestrator.concurrency = 1
    summary = harness.run_pass()
    assert harness.orchestrator._stopping()  # as SIGINT does
    state = harness.orchestrator.get(run.uuid)
    assert state.pipeline.status == Status.PENDING and state.steps[0].status == Status.CREATED
    assert state.pipeline.lease_owner is None and state.pipeline.hook_started_at is None
    assert state.pipeline.crashes == 0 and state.steps[0].error is None
    assert summary.errors == {}
    assert harness.status(other.uuid) == "pending"  # not started after the stop, and released
    assert harness.orchestrator.get(other.uuid).pipeline.lease_owner is None
    harness.orchestrator._stop.clear()
    assert harness.run_until_done(run.uuid) == "finished" and harness.run_until_done(other.uuid) == "finished"
    assert sorted(CALLS) == ["other", "start", "start"]


# --- params ---------------------------------------------------------------------------------------


def test_a_hook_changing_its_params_changes_nothing_stored(harness: Harness, registry: Registry) -> None:
    """Regression: appending to self.params['items'] in a hook that failed twice left three extra
    items in the stored params."""

    def on_start(self: Step) -> None:
        CALLS.append(list(self.params["items"]))
        self.params["items"].append("extra")
        self.context["tenant"] = "mallory"
        if self.attempt < 3:
            raise RuntimeError("try again")

    run = harness.create(pipeline_of(step_of("Mutates", on_start, max_attempts=3)), {"items": ["a"]}, tenant="acme")
    assert harness.run_until_done(run.uuid) == "finished"
    assert CALLS == [["a"], ["a"], ["a"]]
    stored = harness.orchestrator.get(run.uuid).pipeline
    assert stored.params == {"items": ["a"]} and stored.context == {"tenant": "acme"}


# --- outside writes and lease tokens ----------------------------------------------------------------


def test_outside_writes_during_a_hook_never_cost_the_transition(harness: Harness, registry: Registry) -> None:
    """Regression: a second message between the merge's re-read and re-write dropped the
    transition; now the merge repeats while our lease token holds."""
    admin = Orchestrator(harness.repository, clock=harness.clock, registry=registry)

    def on_start(self: Step) -> None:
        CALLS.append("start")
        for index in range(5):
            admin.send(self.pipeline_uuid, "tick", index)

    def on_continue(self: Step) -> None:
        got = [self.receive("tick") for _ in range(5)]
        CALLS.append(got)
        self.finish({"got": got})

    run = harness.create(pipeline_of(step_of("Busy", on_start, on_continue)))
    repository = harness.orchestrator.store.pipelines
    writes = {"n": 0}
    original = repository.compare_and_set

    def racing(uuid: str, expected: int, data: dict[str, Any]) -> bool:
        writes["n"] += 1
        if writes["n"] in (2, 3):  # two more outside writes land between re-read and re-write
            admin.send(uuid, "tick", 100 + writes["n"])
        return original(uuid, expected, data)

    repository.compare_and_set = racing  # type: ignore[method-assign]
    summary = harness.run_pass()
    assert summary.errors == {} and summary.finished == 1
    assert CALLS == ["start", [0, 1, 2, 3, 4]]
    assert harness.event_types(run.uuid).count("message.received") == 5


def test_a_stale_lease_token_of_the_same_worker_cannot_write(registry: Registry) -> None:
    """An abandoned hook thread of an earlier pass must not write over a later claim, even by
    the same orchestrator: leases are judged by the claim's token, not the worker's name."""
    backend = MemoryBackend()
    harness = Harness(backend, registry=registry, lease_seconds=30)
    run = harness.create(pipeline_of(step_of("A", lambda self: None)))
    store = Store(backend)
    orchestrator = harness.orchestrator
    now = harness.clock.now()
    (first,) = store.claim_due(now, orchestrator.new_lease_token(), now + timedelta(seconds=30), 10)
    harness.clock.advance(31)
    later = harness.clock.now()
    (second,) = store.claim_due(later, orchestrator.new_lease_token(), later + timedelta(seconds=30), 10)
    assert first.lease_owner != second.lease_owner and first.lease_owner.split("#")[0] == orchestrator.owner
    first.revision = second.revision - 1  # as read by the first pass before the re-claim
    with pytest.raises(ConcurrentUpdateError):
        orchestrator.runner.advance(first)
    assert harness.orchestrator.get(run.uuid).pipeline.lease_owner == second.lease_owner


# --- hook time bounds (real threads, fake clock) ---------------------------------------------------


def test_a_hung_hook_times_out_and_the_pass_goes_on(harness: Harness, registry: Registry) -> None:
    release = threading.Event()

    def hangs(self: Step) -> None:
        CALLS.append("hang")
        release.wait(30)

    def on_timeout(self: Step) -> None:
        CALLS.append("on_timeout")

    hung = harness.create(pipeline_of(step_of("Hangs", hangs, timeout=0.3, on_timeout=on_timeout)))
    quick = harness.create(pipeline_of(step_of("Quick", lambda self: CALLS.append("quick")), name="Q"))
    harness.orchestrator.concurrency = 1
    started = time.monotonic()
    summary = harness.run_pass()
    try:
        assert time.monotonic() - started < 5
        assert summary.abandoned_hooks == 1 and harness.orchestrator.hooks.abandoned == 1
        assert harness.status(quick.uuid) == "finished"
        state = harness.orchestrator.get(hung.uuid)
        assert state.pipeline.status == Status.FAILED  # max_attempts 1: no retry
        assert state.steps[0].error is not None and state.steps[0].error.type == "HookTimeoutError"
        assert "did not return within 0.3s" in state.steps[0].error.message
        assert CALLS.index("on_timeout") == CALLS.index("hang") + 1 and "quick" in CALLS
    finally:
        release.set()


def test_a_timed_out_step_restarts_per_its_attempts(harness: Harness, registry: Registry) -> None:
    release = threading.Event()

    def on_start(self: Step) -> None:
        CALLS.append(self.attempt)
        if self.attempt == 1:
            release.wait(30)

    run = harness.create(pipeline_of(step_of("Slow", on_start, timeout=0.3, max_attempts=2)))
    try:
        assert harness.run_until_done(run.uuid) == "finished"
    finally:
        release.set()
    assert CALLS == [1, 2]
    types = harness.event_types(run.uuid)
    assert types.count("step.retrying") == 1 and "step.failed" not in types


def test_default_hook_timeout_bounds_steps_without_one(registry: Registry) -> None:
    harness = Harness(registry=registry, hook_timeout=0.2)
    release = threading.Event()
    run = harness.create(pipeline_of(step_of("NoLimit", lambda self: release.wait(30))))
    try:
        harness.run_pass()
    finally:
        release.set()
    step = harness.orchestrator.get(run.uuid).steps[0]
    assert step.status == Status.FAILED and step.error is not None and step.error.type == "HookTimeoutError"
