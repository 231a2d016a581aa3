"""Patches (issue #30 item 3): ``self.patched(id)`` answers per pipeline, from what it recorded
at creation; a deprecated patch answers True and leaves older pipelines blocked; an id the class
does not declare is an error. A deploy is simulated by two registries over one store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step
from prorch.model.exceptions import RegistrationError
from prorch.model.registry import Registry, isolated_registry
from prorch.testing import Harness, MemoryBackend


def app(patches: Sequence[str] = (), deprecated: Sequence[str] = (), asked: str = "fix-rounding") -> Registry:
    """One deploy of the code: a 'Price' pipeline whose hook asks ``patched(asked)`` when the class
    declares anything, else takes the old branch as code written before the patch did."""

    with isolated_registry() as registry:

        @register_step
        class Round(OnStartMixin, Step):
            name = "Round"

            def on_start(self) -> None:
                if patches or deprecated:
                    self.finish({"new": self.patched(asked)})
                else:
                    self.finish({"new": False})

        @register_pipeline
        class Price(Pipeline):
            name = "Price"
            steps = [Round]

        Price.patches = list(patches)
        Price.deprecated_patches = list(deprecated)
    return registry


def run(backend: Any, registry: Registry, uuid: str) -> Any:
    harness = Harness(backend, registry=registry)
    harness.run_pass()
    return harness.orchestrator.get(uuid, workers_code=True)


def create(backend: Any, registry: Registry) -> str:
    return Harness(backend, registry=registry).create(registry.pipeline("Price")).uuid  # type: ignore[arg-type]


def test_patched_answers_by_when_the_pipeline_was_created() -> None:
    backend = MemoryBackend()
    old_code, new_code = app(), app(patches=["fix-rounding"])
    before = create(backend, old_code)
    after = create(backend, new_code)
    assert run(backend, new_code, before).steps[0].output == {"new": False}  # a new worker, an old pipeline
    state = run(backend, new_code, after)
    assert state.steps[0].output == {"new": True}
    assert state.pipeline.metadata["patches"] == ["fix-rounding"]


def test_an_old_worker_leaves_a_pipeline_created_with_a_patch_it_lacks_blocked() -> None:
    backend = MemoryBackend()
    old_code, new_code = app(), app(patches=["fix-rounding"])
    after = create(backend, new_code)
    state = run(backend, old_code, after)
    assert state.pipeline.status.value == "pending" and state.steps[0].status.value == "created"
    assert state.blocked is not None and "'fix-rounding', which this code does not declare" in state.blocked


def test_a_deprecated_patch_answers_true_and_blocks_pipelines_that_predate_it() -> None:
    backend = MemoryBackend()
    old_code, patched_code = app(), app(patches=["fix-rounding"])
    deprecated_code = app(deprecated=["fix-rounding"])
    before = create(backend, old_code)
    during = create(backend, patched_code)
    after = create(backend, deprecated_code)
    stranded = run(backend, deprecated_code, before)
    assert stranded.steps[0].status.value == "created"  # never run down the new branch
    assert stranded.blocked is not None and "predates patch(es) 'fix-rounding'" in stranded.blocked
    assert run(backend, deprecated_code, during).steps[0].output == {"new": True}
    assert run(backend, deprecated_code, after).steps[0].output == {"new": True}
    # the stranded one can still be cancelled (by hand: that is how it ends)
    harness = Harness(backend, registry=deprecated_code)
    assert harness.orchestrator.cancel(before).pipeline.status.value == "cancelled"


def test_asking_for_an_undeclared_patch_fails_the_hook_with_a_clear_error() -> None:
    backend = MemoryBackend()
    code = app(patches=["fix-rounding"], asked="fix-roundnig")
    state = run(backend, code, create(backend, code))
    assert state.pipeline.status.value == "failed"
    error = state.steps[0].error
    assert error is not None and error.type == "StepUsageError"
    assert "declares no patch 'fix-roundnig' (declared: fix-rounding)" in error.message


@pytest.mark.parametrize(
    ("patches", "deprecated", "message"),
    [
        ("fix-rounding", (), "must be a list of ids"),
        (["", "x"], (), "an id is a non-empty str"),
        (["x"], ["x"], "listed twice"),
    ],
)
def test_bad_patch_declarations_are_refused_at_registration(
    registry: Registry, patches: Any, deprecated: Any, message: str
) -> None:
    @register_step
    class Noop(OnStartMixin, Step):
        name = "Noop"

        def on_start(self) -> None:
            self.finish()

    attrs = {"name": "P", "steps": [Noop], "patches": patches, "deprecated_patches": deprecated}
    with pytest.raises(RegistrationError, match=message):
        register_pipeline(type("P", (Pipeline,), attrs))
