"""``self.params`` in a hook: attribute access with a declared ``Params`` model, ``[]`` without
one; the wrong form fails with an error that names the right one (#31)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step
from prorch.testing import Harness, isolated_registry


class Signup(BaseModel):
    email: str


def pipelines(read: Any) -> tuple[type[Pipeline], type[Pipeline]]:
    @register_step
    class Welcome(OnStartMixin, Step):
        name = "Welcome"

        def on_start(self) -> None:
            self.finish({"seen": read(self.params)})

    @register_pipeline
    class Declared(Pipeline):
        name = "Declared"
        steps = [Welcome]
        Params = Signup

    @register_pipeline
    class Undeclared(Pipeline):
        name = "Undeclared"
        steps = [Welcome]

    return Declared, Undeclared


def outcome(pipeline: str, read: Any) -> Any:
    with isolated_registry() as registry, Harness(registry=registry) as h:
        declared, undeclared = pipelines(read)
        run = h.create(declared if pipeline == "declared" else undeclared, params={"email": "a@example.com"})
        h.run_until_done(run.uuid)
        state = h.orchestrator.get(run.uuid)
        step = state.steps[0]
        return step.output, step.error


@pytest.mark.parametrize(("pipeline", "read"), [("declared", lambda p: p.email), ("undeclared", lambda p: p["email"])])
def test_the_right_form_reads_params(pipeline: Any, read: Any) -> None:
    output, error = outcome(pipeline, read)
    assert error is None and output == {"seen": "a@example.com"}


def test_subscripting_a_declared_model_says_to_use_attributes() -> None:
    output, error = outcome("declared", lambda p: p["email"])
    assert output is None and error.type == "TypeError"
    assert "declares a Params model (Signup)" in error.message and "read self.params.email" in error.message


def test_an_attribute_of_undeclared_params_says_to_use_brackets() -> None:
    output, error = outcome("undeclared", lambda p: p.email)
    assert output is None and error.type == "AttributeError"
    assert "pipeline Undeclared declares no Params model" in error.message
    assert "self.params['email']" in error.message and "class Params(BaseModel)" in error.message


def test_params_stay_storable_and_typed() -> None:
    output, error = outcome("undeclared", lambda p: p)  # the whole params dict as an output
    assert error is None and output == {"seen": {"email": "a@example.com"}}
    output, error = outcome("declared", lambda p: isinstance(p, Signup) and p.model_dump())
    assert error is None and output == {"seen": {"email": "a@example.com"}}
