from __future__ import annotations

import pytest
from pydantic import BaseModel

from prorch import (
    DuplicateNameError,
    NotRegisteredError,
    OnContinueMixin,
    OnStartMixin,
    Pipeline,
    PipelineNameNotDefinedError,
    RegistrationError,
    Step,
    StepNameNotDefinedError,
    StepsNotDefinedError,
    register_pipeline,
    register_step,
)
from prorch.model.exceptions import PipelineNameNotDefinedException, StepsNotDefinedException
from prorch.model.registry import Registry


def make_step(name: str = "S", class_name: str | None = None, **attrs: object) -> type[Step]:
    def on_start(self: Step) -> None:
        pass

    return type(class_name or name, (OnStartMixin, Step), {"name": name, "on_start": on_start, **attrs})


def test_registered_step_and_pipeline_are_found(registry: Registry) -> None:
    step = register_step(make_step("A"))
    pipeline = register_pipeline(type("P", (Pipeline,), {"name": "P", "steps": [step]}))
    assert registry.pipeline("P") is pipeline
    assert registry.step("A") is step


def test_duplicate_step_name_is_rejected(registry: Registry) -> None:
    register_step(make_step("A", class_name="First"))
    with pytest.raises(DuplicateNameError, match=r"'A' version 1 is already registered by .*First"):
        register_step(make_step("A", class_name="Second"))


def test_reimported_module_re_registers_the_same_class(registry: Registry) -> None:
    # Same module and qualname: a module imported twice (python -m plus import), not a clash.
    register_step(make_step("A"))
    again = register_step(make_step("A"))
    assert registry.step("A") is again


def test_duplicate_pipeline_name_is_rejected(registry: Registry) -> None:
    step = register_step(make_step("A"))
    register_pipeline(type("P1", (Pipeline,), {"name": "P", "steps": [step]}))
    register_pipeline(type("P1", (Pipeline,), {"name": "P", "steps": [step]}))  # re-import: fine
    with pytest.raises(DuplicateNameError, match="pipeline name 'P'"):
        register_pipeline(type("P2", (Pipeline,), {"name": "P", "steps": [step]}))


def test_same_name_with_another_version_is_accepted(registry: Registry) -> None:
    v1 = register_step(make_step("A"))
    v2 = register_step(make_step("A", version=2))
    assert registry.step("A") is v2
    assert registry.step("A", 1) is v1


def test_step_without_name_is_rejected(registry: Registry) -> None:
    with pytest.raises(StepNameNotDefinedError, match="has no `name`"):
        register_step(make_step(""))


def test_pipeline_without_name_is_rejected(registry: Registry) -> None:
    step = register_step(make_step("A"))
    with pytest.raises(PipelineNameNotDefinedError):
        register_pipeline(type("P", (Pipeline,), {"steps": [step]}))
    # the prorch 1.0.1 name catches it too
    with pytest.raises(PipelineNameNotDefinedException):
        register_pipeline(type("P", (Pipeline,), {"steps": [step]}))


def test_pipeline_without_steps_is_rejected(registry: Registry) -> None:
    with pytest.raises(StepsNotDefinedError, match="has no `steps`"):
        register_pipeline(type("P", (Pipeline,), {"name": "P"}))
    with pytest.raises(StepsNotDefinedException):
        register_pipeline(type("P", (Pipeline,), {"name": "P", "steps": []}))


def test_unregistered_step_in_list_is_rejected(registry: Registry) -> None:
    with pytest.raises(RegistrationError, match="is not one"):
        register_pipeline(type("P", (Pipeline,), {"name": "P", "steps": [make_step("A")]}))


def test_non_step_in_list_is_rejected(registry: Registry) -> None:
    with pytest.raises(RegistrationError, match="registered Step classes"):
        register_pipeline(type("P", (Pipeline,), {"name": "P", "steps": ["A"]}))


def test_step_listed_twice_is_rejected(registry: Registry) -> None:
    step = register_step(make_step("A"))
    with pytest.raises(RegistrationError, match="twice"):
        register_pipeline(type("P", (Pipeline,), {"name": "P", "steps": [step, step]}))


def test_mixin_without_its_hook_is_rejected(registry: Registry) -> None:
    cls = type("C", (OnContinueMixin, Step), {"name": "C"})
    with pytest.raises(RegistrationError, match="defines no on_continue"):
        register_step(cls)


def test_non_step_class_is_rejected(registry: Registry) -> None:
    with pytest.raises(RegistrationError, match="needs a Step subclass"):
        register_step(type("X", (), {"name": "X"}))  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [0, "2", True])
def test_bad_version_is_rejected(registry: Registry, version: object) -> None:
    with pytest.raises(RegistrationError, match="version must be an int"):
        register_step(make_step("A", version=version))


def test_params_must_be_a_pydantic_model(registry: Registry) -> None:
    step = register_step(make_step("A"))
    with pytest.raises(RegistrationError, match="Params must be a pydantic"):
        register_pipeline(type("P", (Pipeline,), {"name": "P", "steps": [step], "Params": dict}))
    ok = type("Params", (BaseModel,), {"__annotations__": {"path": str}})
    register_pipeline(type("P", (Pipeline,), {"name": "P", "steps": [step], "Params": ok}))


def test_unknown_name_lookup_says_what_is_registered(registry: Registry) -> None:
    register_step(make_step("A"))
    with pytest.raises(NotRegisteredError, match=r"no step named 'B' is registered \(registered: A\)"):
        registry.step("B")
    with pytest.raises(NotRegisteredError, match="version 3 is not registered"):
        registry.step("A", 3)
