"""Every row of the lifecycle table (DESIGN section 2), on the in-memory backend with a fake
clock: no sleeps."""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from prorch import (
    InvalidParamsError,
    OnContinueMixin,
    OnStartMixin,
    Status,
    Step,
    register_step,
)
from prorch.model.registry import Registry
from prorch.testing import Harness
from tests.support import builders
from tests.support.builders import pipeline_of

CALLS: list[str] = []
quick = functools.partial(builders.quick, log=CALLS)


@pytest.fixture(autouse=True)
def _clear_calls() -> None:
    CALLS.clear()


def steps_of(harness: Harness, uuid: str) -> dict[str, Any]:
    return {s.name: s for s in harness.orchestrator.get(uuid).steps}


# --- create -----------------------------------------------------------------------------------


def test_create_stores_pending_and_due_and_runs_no_hook(harness: Harness, registry: Registry) -> None:
    p = pipeline_of(quick("A"))
    run = harness.create(p)
    state = harness.orchestrator.get(run.uuid)
    assert state.pipeline.status == Status.PENDING
    assert state.pipeline.next_run_at == harness.clock.now()
    assert [s.status for s in state.steps] == [Status.CREATED]
    assert CALLS == []
    assert harness.event_types(run.uuid) == ["pipeline.created"]


def test_invalid_params_raise_and_store_nothing(harness: Harness, registry: Registry) -> None:
    class Params(BaseModel):
        path: str
        retries: int = 1

    p = pipeline_of(quick("A"), Params=Params)
    with pytest.raises(InvalidParamsError, match="path: Field required"):
        harness.create(p, {"retries": "many"})
    assert harness.orchestrator.list_pipelines() == []
    assert harness.repository.tables["STEP"] == {}
    assert harness.repository.tables["EVENT"] == {}


def test_params_without_model_must_be_json(harness: Harness, registry: Registry) -> None:
    p = pipeline_of(quick("A"))
    with pytest.raises(InvalidParamsError, match=r"params\['when'\]: object is not a JSON value"):
        harness.create(p, {"when": object()})
    assert harness.orchestrator.list_pipelines() == []


def test_params_model_is_what_steps_see(harness: Harness, registry: Registry) -> None:
    class Params(BaseModel):
        path: str

    seen: list[Any] = []

    def on_start(self: Step) -> None:
        seen.append(self.params)

    a = register_step(type("A", (OnStartMixin, Step), {"name": "A", "on_start": on_start}))
    p = pipeline_of(a, Params=Params)
    run = harness.create(p, {"path": "/data"})
    harness.run_pass()
    assert seen == [Params(path="/data")]
    assert run.params == Params(path="/data")


# --- on_start / on_continue ----------------------------------------------------------------------


def test_step_without_on_continue_finishes_when_on_start_returns(harness: Harness, registry: Registry) -> None:
    run = harness.create(pipeline_of(quick("A")))
    summary = harness.run_pass()
    assert (summary.claimed, summary.finished) == (1, 1)
    assert harness.status(run.uuid) == "finished"
    assert harness.event_types(run.uuid) == [
        "pipeline.created",
        "pipeline.started",
        "step.started",
        "step.finished",
        "pipeline.finished",
    ]


def test_on_continue_runs_right_after_on_start_then_on_every_resume(harness: Harness, registry: Registry) -> None:
    class Poll(OnStartMixin, OnContinueMixin, Step):
        name = "Poll"

        def on_start(self) -> None:
            CALLS.append("start")
            self.metadata["polls"] = 0

        def on_continue(self) -> None:
            self.metadata["polls"] += 1
            CALLS.append(f"continue{self.metadata['polls']}")
            if self.metadata["polls"] == 3:
                self.finish({"polls": self.metadata["polls"]})

    register_step(Poll)
    run = harness.create(pipeline_of(Poll))
    harness.run_pass()
    assert CALLS == ["start", "continue1"]
    assert harness.status(run.uuid) == "pending"
    harness.run_pass()
    harness.run_pass()
    assert CALLS == ["start", "continue1", "continue2", "continue3"]
    assert harness.status(run.uuid) == "finished"
    assert steps_of(harness, run.uuid)["Poll"].output == {"polls": 3}
    # metadata persisted across passes
    assert steps_of(harness, run.uuid)["Poll"].metadata == {"polls": 3}
    # a finished pipeline is not run again
    harness.run_pass()
    assert len(CALLS) == 4


def test_continue_only_step_runs_on_continue_first(harness: Harness, registry: Registry) -> None:
    class OnlyContinue(OnContinueMixin, Step):
        name = "OnlyContinue"

        def on_continue(self) -> None:
            CALLS.append("continue")
            self.finish()

    register_step(OnlyContinue)
    run = harness.create(pipeline_of(OnlyContinue))
    harness.run_pass()
    assert CALLS == ["continue"]
    assert harness.status(run.uuid) == "finished"


# --- finish and outputs --------------------------------------------------------------------------


def test_finish_output_is_visible_to_later_steps(harness: Harness, registry: Registry) -> None:
    seen: dict[str, Any] = {}

    class Make(OnStartMixin, Step):
        name = "Make"

        def on_start(self) -> None:
            self.finish(output={"file": "/backups/1.tar"})

    class Use(OnStartMixin, Step):
        name = "Use"

        def on_start(self) -> None:
            seen.update(self.outputs)

    register_step(Make)
    register_step(Use)
    run = harness.create(pipeline_of(Make, Use))
    harness.run_pass()
    assert seen == {"Make": {"file": "/backups/1.tar"}}
    assert steps_of(harness, run.uuid)["Make"].output == {"file": "/backups/1.tar"}


def test_quick_steps_all_run_in_one_pass_up_to_the_bound(registry: Registry) -> None:
    p = pipeline_of(quick("A"), quick("B"), quick("C"))
    one_pass = Harness(registry=registry)
    run = one_pass.create(p)
    assert one_pass.run_pass().transitions == 3
    assert one_pass.status(run.uuid) == "finished"

    bounded = Harness(registry=registry, max_turns_per_pass=2)
    run = bounded.create(p)
    bounded.run_pass()
    assert bounded.status(run.uuid) == "pending"
    assert [s.status for s in bounded.orchestrator.get(run.uuid).steps] == [
        Status.FINISHED,
        Status.FINISHED,
        Status.CREATED,
    ]
    bounded.run_pass()
    assert bounded.status(run.uuid) == "finished"


def test_output_model_validates_finish(harness: Harness, registry: Registry) -> None:
    class Out(BaseModel):
        file: str
        size: int

    class Typed(OnStartMixin, Step):
        name = "Typed"
        Output = Out

        def on_start(self) -> None:
            self.finish({"file": "x", "size": "big"})

    register_step(Typed)
    run = harness.create(pipeline_of(Typed))
    harness.run_pass()
    step = steps_of(harness, run.uuid)["Typed"]
    assert step.status == Status.FAILED
    assert step.error is not None and step.error.type == "InvalidOutputError"
    assert "size" in step.error.message
    assert step.output is None


def test_non_json_output_fails_the_step_and_stores_nothing(harness: Harness, registry: Registry) -> None:
    calls = []

    class Bad(OnStartMixin, Step):
        name = "Bad"
        max_attempts = 3  # results that cannot be stored are a failed attempt, retried per policy

        def on_start(self) -> None:
            calls.append(self.attempt)
            self.finish({"handle": object()})

    register_step(Bad)
    run = harness.create(pipeline_of(Bad))
    assert harness.run_until_done(run.uuid) == "failed"
    step = steps_of(harness, run.uuid)["Bad"]
    assert calls == [1, 2, 3]
    assert step.status == Status.FAILED
    assert step.error is not None and "output['handle']: object is not a JSON value" in step.error.message
    assert step.output is None


# --- fail / exceptions / retries ------------------------------------------------------------------


def test_fail_fails_step_and_pipeline_at_once(harness: Harness, registry: Registry) -> None:
    class Failing(OnStartMixin, Step):
        name = "Failing"
        max_attempts = 5

        def on_start(self) -> None:
            self.fail("disk full")

    register_step(Failing)
    b = quick("B")
    run = harness.create(pipeline_of(Failing, b))
    summary = harness.run_pass()
    assert summary.failed == 1
    state = harness.orchestrator.get(run.uuid)
    assert state.pipeline.status == Status.FAILED
    assert state.pipeline.last_error is not None and state.pipeline.last_error.message == "disk full"
    assert [s.status for s in state.steps] == [Status.FAILED, Status.CREATED]
    assert "B.start" not in CALLS
    assert harness.event_types(run.uuid)[-2:] == ["step.failed", "pipeline.failed"]


def test_exception_is_stored_and_the_pass_goes_on(harness: Harness, registry: Registry) -> None:
    class Boom(OnStartMixin, Step):
        name = "Boom"

        def on_start(self) -> None:
            raise RuntimeError("kaput")

    register_step(Boom)
    bad = harness.create(pipeline_of(Boom, name="Bad"))
    good = harness.create(pipeline_of(quick("A"), name="Good"))
    summary = harness.run_pass()
    assert (summary.claimed, summary.failed, summary.finished) == (2, 1, 1)
    assert summary.errors == {}
    error = steps_of(harness, bad.uuid)["Boom"].error
    assert error is not None
    assert (error.type, error.message) == ("RuntimeError", "kaput")
    assert error.traceback is not None and "raise RuntimeError" in error.traceback
    assert harness.status(bad.uuid) == "failed"
    assert harness.status(good.uuid) == "finished"


def test_exception_is_retried_with_backoff_and_a_stable_idempotency_key(harness: Harness, registry: Registry) -> None:
    keys: list[tuple[int, str]] = []

    class Flaky(OnStartMixin, Step):
        name = "Flaky"
        max_attempts = 3

        def on_start(self) -> None:
            keys.append((self.attempt, self.idempotency_key))
            if self.attempt < 3:
                raise ConnectionError("try later")

    register_step(Flaky)
    run = harness.create(pipeline_of(Flaky))
    harness.run_pass()
    step = steps_of(harness, run.uuid)["Flaky"]
    assert step.status == Status.CREATED  # start not recorded: on_start runs again
    assert step.attempt == 2
    assert step.next_run_at is not None and step.next_run_at > harness.clock.now()
    # not due before the backoff has passed
    assert harness.run_pass().claimed == 0
    assert harness.run_until_done(run.uuid) == "finished"
    assert [attempt for attempt, _ in keys] == [1, 2, 3]
    assert len({key for _, key in keys}) == 1
    assert harness.event_types(run.uuid).count("step.retrying") == 2


def test_retries_exhausted_fail_the_step(harness: Harness, registry: Registry) -> None:
    class Always(OnStartMixin, Step):
        name = "Always"
        max_attempts = 2

        def on_start(self) -> None:
            CALLS.append("try")
            raise ValueError("no")

    register_step(Always)
    run = harness.create(pipeline_of(Always))
    assert harness.run_until_done(run.uuid) == "failed"
    assert CALLS == ["try", "try"]
    assert harness.event_types(run.uuid).count("step.failed") == 1


# --- cancel -------------------------------------------------------------------------------------


def test_cancel_from_a_hook_cancels_the_pipeline_and_runs_on_cancel(harness: Harness, registry: Registry) -> None:
    class Cancelling(OnStartMixin, Step):
        name = "Cancelling"

        def on_start(self) -> None:
            self.cancel()

        def on_cancel(self) -> None:
            CALLS.append("on_cancel")

    register_step(Cancelling)
    run = harness.create(pipeline_of(Cancelling, quick("B")))
    summary = harness.run_pass()
    assert summary.cancelled == 1
    assert harness.status(run.uuid) == "cancelled"
    assert CALLS == ["on_cancel"]
    assert harness.event_types(run.uuid)[-2:] == ["step.cancelled", "pipeline.cancelled"]


def test_orchestrator_cancel_runs_on_cancel_of_the_current_step(harness: Harness, registry: Registry) -> None:
    class Waiting(OnStartMixin, OnContinueMixin, Step):
        name = "Waiting"

        def on_start(self) -> None:
            pass

        def on_continue(self) -> None:
            self.wait(seconds=3600)

        def on_cancel(self) -> None:
            CALLS.append("on_cancel")

    register_step(Waiting)
    run = harness.create(pipeline_of(Waiting))
    harness.run_pass()
    state = harness.orchestrator.cancel(run.uuid)
    assert state.pipeline.status == Status.CANCELLED
    assert state.steps[0].status == Status.CANCELLED
    assert CALLS == ["on_cancel"]
    harness.clock.advance(7200)
    assert harness.run_pass().claimed == 0


# --- wait ---------------------------------------------------------------------------------------


def test_wait_seconds_returns_at_once_and_defers_the_pipeline(harness: Harness, registry: Registry) -> None:
    class Sleepy(OnStartMixin, OnContinueMixin, Step):
        name = "Sleepy"

        def on_start(self) -> None:
            self.metadata["ready_at"] = (self.now + timedelta(seconds=60)).isoformat()

        def on_continue(self) -> None:
            CALLS.append("continue")
            if self.now.isoformat() >= self.metadata["ready_at"]:
                self.finish()
            else:
                self.wait(seconds=60)

    register_step(Sleepy)
    run = harness.create(pipeline_of(Sleepy))
    summary = harness.run_pass()
    assert summary.waiting == 1
    assert harness.orchestrator.get(run.uuid).pipeline.next_run_at == harness.clock.now() + timedelta(seconds=60)
    harness.clock.advance(59)
    assert harness.run_pass().claimed == 0  # waiting pipelines are not claimed
    harness.clock.advance(1)
    assert harness.run_pass().finished == 1
    assert CALLS == ["continue", "continue"]


def test_wait_until_a_time(harness: Harness, registry: Registry) -> None:
    class Until(OnContinueMixin, Step):
        name = "Until"

        def on_continue(self) -> None:
            if CALLS:
                self.finish()
            else:
                CALLS.append("wait")
                self.wait(until=self.now + timedelta(hours=2))

    register_step(Until)
    run = harness.create(pipeline_of(Until))
    harness.run_pass()
    harness.clock.advance(7199)
    assert harness.run_pass().claimed == 0
    harness.clock.advance(1)
    harness.run_pass()
    assert harness.status(run.uuid) == "finished"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({}, "exactly one"), ({"seconds": -1}, ">= 0"), ({"seconds": 1, "until": None}, None)],
)
def test_wait_rejects_bad_arguments(
    harness: Harness, registry: Registry, kwargs: dict[str, Any], message: str | None
) -> None:
    class W(OnStartMixin, OnContinueMixin, Step):
        name = "W"

        def on_start(self) -> None:
            self.wait(**kwargs)

        def on_continue(self) -> None:
            self.finish()

    register_step(W)
    run = harness.create(pipeline_of(W))
    harness.run_pass()
    step = steps_of(harness, run.uuid)["W"]
    if message is None:
        assert step.status == Status.PENDING
    else:
        assert step.status == Status.FAILED
        assert step.error is not None and step.error.type == "StepUsageError" and message in step.error.message


def test_a_wait_in_a_step_without_on_continue_is_a_usage_error(harness: Harness, registry: Registry) -> None:
    """Regression (#25): such a step (it finishes when on_start returns) ran on_start again after
    every wait, so it never finished, silently. Now its wait() fails it with the fix named."""
    calls: list[str] = []

    class Poll(OnStartMixin, Step):
        name = "Poll"

        def on_start(self) -> None:
            calls.append("on_start")
            self.wait(seconds=60)

    register_step(Poll)
    run = harness.create(pipeline_of(Poll))
    harness.run_pass()
    harness.clock.advance(61)
    harness.run_pass()
    step = steps_of(harness, run.uuid)["Poll"]
    assert harness.status(run.uuid) == "failed" and calls == ["on_start"]
    assert step.error is not None and step.error.type == "StepUsageError"
    assert "step Poll called wait() but defines no on_continue()" in step.error.message


def test_two_verdicts_in_one_hook_are_a_usage_error(harness: Harness, registry: Registry) -> None:
    class Twice(OnStartMixin, Step):
        name = "Twice"

        def on_start(self) -> None:
            self.finish()
            self.fail("also")

    register_step(Twice)
    run = harness.create(pipeline_of(Twice))
    harness.run_pass()
    step = steps_of(harness, run.uuid)["Twice"]
    assert step.status == Status.FAILED
    assert step.error is not None and "already called finish()" in step.error.message


def test_harness_drive_stops_at_a_wait_without_moving_the_clock(harness: Harness, registry: Registry) -> None:
    class TwoWaits(OnContinueMixin, Step):
        name = "TwoWaits"

        def on_continue(self) -> None:
            CALLS.append("continue")
            if len(CALLS) < 3:
                self.wait(seconds=10)
            else:
                self.finish()

    register_step(TwoWaits)
    run = harness.create(pipeline_of(TwoWaits, quick("B")))
    start = harness.clock.now()
    assert harness.drive(run.uuid) == "pending"
    assert (CALLS, harness.clock.now()) == (["continue"], start)
    assert harness.run_until_done(run.uuid) == "finished"
    assert CALLS == ["continue", "continue", "continue", "B.start"]


def test_create_many_stores_a_batch_or_nothing(harness: Harness, registry: Registry) -> None:
    class Params(BaseModel):
        n: int

    p = pipeline_of(quick("A"), Params=Params)
    with pytest.raises(InvalidParamsError, match=r"params #2: invalid params for pipeline P: n:"):
        p.create_many(harness.repository, [{"n": 1}, {"n": 2}, {"n": "three"}], clock=harness.clock)
    assert harness.orchestrator.list_pipelines() == []
    assert harness.repository.tables.get("STEP", {}) == {}
    made = p.create_many(harness.repository, [{"n": i} for i in range(5)], tenant="acme", clock=harness.clock)
    assert [m.params.n for m in made] == list(range(5))
    assert harness.run_pass().finished == 5
    assert all(r.context == {"tenant": "acme"} for r in harness.orchestrator.list_pipelines())
    assert CALLS.count("A.start") == 5
