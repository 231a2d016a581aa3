"""The one place that builds the pipelines and steps of the tests, registered in the current
registry (the tests' autouse fixture gives each test a fresh one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prorch import OnContinueMixin, OnStartMixin, Pipeline, Step, register_pipeline, register_step


def pipeline_of(*steps: type[Step], name: str = "P", **attrs: Any) -> type[Pipeline]:
    """A registered pipeline of these steps (``attrs``: version, priority, Params...)."""
    return register_pipeline(type(name, (Pipeline,), {"name": name, "steps": list(steps), **attrs}))


def step_of(
    name: str,
    on_start: Callable[[Any], Any] | None = None,
    on_continue: Callable[[Any], Any] | None = None,
    **attrs: Any,
) -> type[Step]:
    """A registered step with these hooks (functions taking the step) and class attributes."""
    bases: tuple[type, ...] = (Step,)
    body: dict[str, Any] = {"name": name, **attrs}
    if on_continue is not None:
        bases = (OnContinueMixin, *bases)
        body["on_continue"] = on_continue
    if on_start is not None:
        bases = (OnStartMixin, *bases)
        body["on_start"] = on_start
    return register_step(type(name, bases, body))


def quick(name: str, log: list[str] | None = None, entry: str = "{name}.start") -> type[Step]:
    """A step with ``on_start`` only (it finishes when ``on_start`` returns), which appends
    ``entry`` (with ``{name}`` and ``{pipeline}`` filled in) to ``log`` when given."""

    def on_start(self: Step) -> None:
        if log is not None:
            log.append(entry.format(name=self.name, pipeline=self.pipeline_uuid))

    return step_of(name, on_start=on_start)
