"""The registry given to an Orchestrator or a Harness is the one used everywhere, never the global
one behind it (the architecture issue, item 1)."""

from __future__ import annotations

from typing import Any

from prorch import OnStartMixin, Pipeline, Step
from prorch.features.reactions import on_event, reactions_of
from prorch.model.registry import Registry, current_registry
from prorch.testing import Harness

SEEN: list[Any] = []


class Hello(OnStartMixin, Step):
    name = "InjectedHello"

    def on_start(self) -> None:
        SEEN.append(self.params["who"])
        self.finish({"said": f"hello {self.params['who']}"})


class Greeting(Pipeline):
    name = "InjectedGreeting"
    steps = [Hello]


def own_registry() -> Registry:
    registry = Registry()
    registry.add_step(Hello)
    registry.add_pipeline(Greeting)
    return registry


def test_a_harness_with_its_own_registry_creates_and_runs() -> None:
    """Regression: Harness(registry=r).create(P) raised NotRegisteredError unless r was global."""
    SEEN.clear()
    registry = own_registry()
    assert "InjectedGreeting" not in current_registry().pipelines
    harness = Harness(registry=registry)
    run = harness.create(Greeting, {"who": "ada"})
    assert harness.run_until_done(run.uuid) == "finished"
    assert SEEN == ["ada"]
    again = harness.create(Greeting, {"who": "ada"}, key="ada")
    assert again.created is True
    assert "InjectedGreeting" not in current_registry().pipelines


def test_reactions_of_the_injected_registry_fire() -> None:
    SEEN.clear()
    registry = own_registry()
    on_event("pipeline.finished", pipeline="InjectedGreeting", registry=registry)(
        lambda event, ctx: SEEN.append(("reacted", event.pipeline_uuid))
    )
    harness = Harness(registry=registry)
    run = harness.create(Greeting, {"who": "bob"})
    for _ in range(4):
        harness.run_pass()
    assert ["bob", ("reacted", run.uuid)] == SEEN
    assert all(r.pipeline != "InjectedGreeting" for r in reactions_of(current_registry()))
