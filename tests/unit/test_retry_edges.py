"""``Orchestrator.retry`` of a failed step runs again the hook that failed, and a step never
finishes without a verdict or a returned hook; its Output model always applies."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from prorch import OnContinueMixin, OnStartMixin, Pipeline, Step, register_step
from prorch.model.registry import Registry
from prorch.testing import Harness
from tests.support.builders import pipeline_of

CALLS: list[str] = []


class CheckOutput(BaseModel):
    ok: bool


def declare(fails_in: str, how: str, with_continue: bool) -> type[Pipeline]:
    """[Check, Ship]: Check fails once (``fail()`` or raise) in ``fails_in``, then succeeds."""
    failed = {"done": False}

    def act(self: Step, hook: str) -> None:
        CALLS.append(hook)
        if hook == fails_in and not failed["done"]:
            failed["done"] = True
            if how == "fail":
                self.fail("input is corrupt")
                return
            raise RuntimeError("input is corrupt")
        if hook == "on_continue" or not with_continue:
            self.finish({"ok": True})

    body: dict[str, Any] = {"name": "Check", "Output": CheckOutput, "on_start": lambda self: act(self, "on_start")}
    bases: tuple[type, ...] = (OnStartMixin, Step)
    if with_continue:
        body["on_continue"] = lambda self: act(self, "on_continue")
        bases = (OnStartMixin, OnContinueMixin, Step)
    check = register_step(type("Check", bases, body))

    class Ship(OnStartMixin, Step):
        name = "Ship"

        def on_start(self) -> None:
            CALLS.append("ship")

    register_step(Ship)
    return pipeline_of(check, Ship, name="CheckShip")


CASES = [
    ("on_start", "fail", False),
    ("on_start", "raise", False),
    ("on_start", "fail", True),
    ("on_start", "raise", True),
    ("on_continue", "fail", True),
    ("on_continue", "raise", True),
]


@pytest.mark.parametrize(("fails_in", "how", "with_continue"), CASES)
def test_retry_runs_again_the_hook_that_failed(
    harness: Harness, registry: Registry, fails_in: str, how: str, with_continue: bool
) -> None:
    """Regression: a retried step went back to pending, and one without on_continue was then
    taken as finished, with output None, without running: its Output model bypassed."""
    CALLS.clear()
    run = harness.create(declare(fails_in, how, with_continue))
    assert harness.run_until_done(run.uuid) == "failed"
    assert "ship" not in CALLS
    before = list(CALLS)
    harness.orchestrator.retry(run.uuid)
    assert harness.run_until_done(run.uuid) == "finished"
    rerun = CALLS[len(before) :]
    assert rerun[0] == fails_in  # the hook that failed runs again first
    assert rerun[-1] == "ship"
    check = harness.orchestrator.get(run.uuid).steps[0]
    assert check.output == {"ok": True}


def test_a_step_that_only_returns_is_validated_against_its_output_model(harness: Harness, registry: Registry) -> None:
    class Returns(OnStartMixin, Step):
        name = "Returns"
        Output = CheckOutput

        def on_start(self) -> None:
            CALLS.append("start")

    register_step(Returns)
    run = harness.create(pipeline_of(Returns, name="R"))
    assert harness.run_until_done(run.uuid) == "failed"
    step = harness.orchestrator.get(run.uuid).steps[0]
    assert step.error is not None and "does not match its Output model" in step.error.message
    assert step.output is None


def test_a_waiting_step_that_times_out_with_attempts_left_starts_again_with_a_fresh_window(
    harness: Harness, registry: Registry
) -> None:
    """Untested before: the timeout of a step waiting in on_continue, with attempts left. It
    restarts from on_start after the backoff, and its next timeout counts from that start."""
    starts: list[float] = []

    class Slow(OnStartMixin, OnContinueMixin, Step):
        name = "Slow"
        timeout = 60
        max_attempts = 2
        retry_delay = 10

        def on_start(self) -> None:
            starts.append((harness.clock.now() - t0).total_seconds())

        def on_continue(self) -> None:
            self.wait(3600)

    register_step(Slow)
    run = harness.create(pipeline_of(Slow))
    t0 = harness.clock.now()
    assert harness.run_until_done(run.uuid) == "failed"
    assert len(starts) == 2 and starts[0] == 0 and 60 < starts[1] <= 70  # timed out at 60, backed off
    again = starts[1]
    events = [(e.type.value, e.data, (e.at - t0).total_seconds()) for e in harness.history(run.uuid)]
    retrying = [(data, at) for kind, data, at in events if kind == "step.retrying"]
    assert len(retrying) == 1 and retrying[0][1] == 60
    assert retrying[0][0]["attempt"] == 2 and retrying[0][0]["timeout"] is True
    started = [(data["attempt"], at) for kind, data, at in events if kind == "step.started"]
    assert started == [(1, 0), (2, again)]
    history = harness.history(run.uuid)
    second_start = [e.at for e in history if e.type.value == "step.started"][1]
    failed = [(e.data.get("timeout"), e.at - second_start) for e in history if e.type.value == "step.failed"]
    assert failed == [(True, timedelta(seconds=60))]  # 60 s after the second start, not after the first
    step = harness.orchestrator.get(run.uuid).steps[0]
    assert step.attempt == 2 and step.finished_at == second_start + timedelta(seconds=60)
