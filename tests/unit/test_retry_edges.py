"""``Orchestrator.retry`` of a failed step runs again the hook that failed, and a step never
finishes without a verdict or a returned hook; its Output model always applies."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from prorch import OnContinueMixin, OnStartMixin, Pipeline, Step, register_step
from prorch.registry import Registry
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
