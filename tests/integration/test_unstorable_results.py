"""A hook's results that cannot be stored, on every backend: checked the same way before anything
is written, counted as a failed attempt, never converted and never an endless loop."""

from __future__ import annotations

from typing import Any

import pytest

from prorch import OnStartMixin, Orchestrator, Pipeline, Status, Step, register_step
from prorch.model.exceptions import InvalidMessageError, InvalidParamsError
from prorch.model.registry import Registry
from prorch.testing import Harness
from tests.support.builders import pipeline_of

BAD_VALUES = {
    "nan": float("nan"),
    "inf": float("-inf"),
    "nul": "a\x00b",
    "int-key": {1: "one"},
    "bytes": b"raw",
    "set": {"a"},
    "datetime-like object": object(),
}


def declare(value: Any) -> type[Pipeline]:
    calls: list[int] = []

    class Leaves(OnStartMixin, Step):
        name = "Leaves"
        max_attempts = 2
        retry_delay = 0.5

        def on_start(self) -> None:
            calls.append(self.attempt)
            self.metadata["left"] = value

    register_step(Leaves)
    pipeline = pipeline_of(Leaves, name="Bad")
    pipeline.calls = calls  # type: ignore[attr-defined]
    return pipeline


@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_unstorable_metadata_fails_the_step_after_its_attempts(backend: Any, registry: Registry, kind: str) -> None:
    pipeline = declare(BAD_VALUES[kind])
    harness = Harness(backend, registry=registry)
    run = harness.create(pipeline)
    assert harness.run_until_done(run.uuid, max_passes=10) == "failed"
    assert pipeline.calls == [1, 2]  # type: ignore[attr-defined]
    step = harness.orchestrator.get(run.uuid).steps[0]
    assert step.status == Status.FAILED and step.metadata == {}
    assert step.error is not None and step.error.type == "UnstorableResultError"
    assert "metadata['left']" in step.error.message


@pytest.mark.parametrize("kind", ["nan", "nul", "int-key", "set"])
def test_unstorable_params_and_payloads_store_nothing(backend: Any, registry: Registry, kind: str) -> None:
    pipeline = declare(None)
    harness = Harness(backend, registry=registry)
    with pytest.raises(InvalidParamsError, match=r"params\['x'\]"):
        harness.create(pipeline, {"x": BAD_VALUES[kind]})
    assert harness.orchestrator.list_pipelines() == []
    run = harness.create(pipeline, {"x": 1})
    with pytest.raises(InvalidMessageError, match=r"payload\['x'\]"):
        Orchestrator(backend, clock=harness.clock, registry=registry).send(run.uuid, "m", {"x": BAD_VALUES[kind]})
    assert harness.orchestrator.store.messages_of(run.uuid) == []


def test_json_values_come_back_exactly(backend: Any, registry: Registry) -> None:
    value = {"int": 2**53 + 1, "float": 0.1, "neg": -0.0, "text": "é ✓ \\u0000", "list": [[], {}], "t": True}

    class Keeps(OnStartMixin, Step):
        name = "Keeps"

        def on_start(self) -> None:
            self.metadata["value"] = self.params["value"]
            self.finish(self.params["value"])

    register_step(Keeps)
    pipeline = pipeline_of(Keeps, name="Keep")
    harness = Harness(backend, registry=registry)
    run = harness.create(pipeline, {"value": value})
    assert harness.run_until_done(run.uuid) == "finished"
    state = harness.orchestrator.get(run.uuid)
    assert state.pipeline.params == {"value": value}
    assert state.steps[0].output == value and state.steps[0].metadata == {"value": value}
