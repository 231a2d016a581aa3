"""Versions: a pipeline keeps the versions it was created with; new ones take the newest or the
one asked for; a missing version blocks, never falls back."""

from __future__ import annotations

import pytest

from prorch import NotRegisteredError, OnStartMixin, Pipeline, Step, register_pipeline, register_step
from prorch.model.registry import Registry
from prorch.testing import Harness

RAN: list[str] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    RAN.clear()


def step_version(version: int) -> type[Step]:
    def on_start(self: Step) -> None:
        RAN.append(f"Charge v{version} for {self.pipeline_uuid[:8]}")

    attrs = {"name": "Charge", "version": version, "on_start": on_start}
    return register_step(type(f"ChargeV{version}", (OnStartMixin, Step), attrs))


def pipeline_version(version: int, step: type[Step]) -> type[Pipeline]:
    attrs = {"name": "Order", "version": version, "steps": [step]}
    return register_pipeline(type(f"OrderV{version}", (Pipeline,), attrs))


def test_in_flight_pipelines_keep_their_version_after_a_newer_one_is_registered(registry: Registry) -> None:
    harness = Harness(registry=registry)
    v1 = pipeline_version(1, step_version(1))
    old = harness.create(v1)
    # deploy: version 2 is registered beside version 1
    v2 = pipeline_version(2, step_version(2))
    new = harness.create(registry.pipeline("Order"))  # the newest, as `prorch start Order` does
    pinned = harness.create(v2, version=1)  # or the one asked for
    harness.run_pass()
    assert sorted(RAN) == sorted(
        [f"Charge v1 for {old.uuid[:8]}", f"Charge v2 for {new.uuid[:8]}", f"Charge v1 for {pinned.uuid[:8]}"]
    )
    assert [harness.orchestrator.get(u).pipeline.version for u in (old.uuid, new.uuid, pinned.uuid)] == [1, 2, 1]
    assert harness.orchestrator.get(new.uuid).steps[0].version == 2


def test_a_missing_version_blocks_with_its_number_and_resumes_when_deployed(registry: Registry) -> None:
    harness = Harness(registry=registry)
    v1_step = step_version(1)
    v1 = pipeline_version(1, v1_step)
    run = harness.create(v1)
    pipeline_version(2, step_version(2))
    del registry.pipelines["Order"][1]  # a deploy that dropped version 1 too early
    summary = harness.run_pass()
    assert summary.claimed == 0  # this worker has no version 1: it leaves it to one that has (#25)
    blocked = harness.orchestrator.get(run.uuid).blocked
    assert blocked is not None and "pipeline 'Order' version 1 is not registered (registered versions: 2)" in blocked
    assert RAN == []  # no silent fallback to version 2
    assert harness.status(run.uuid) == "pending"
    registry.pipelines["Order"][1] = v1  # version 1 deployed again: at once, no lease to wait out
    assert harness.run_until_done(run.uuid) == "finished"
    assert [f"Charge v1 for {run.uuid[:8]}"] == RAN


def test_asking_for_an_unregistered_version_stores_nothing(registry: Registry) -> None:
    harness = Harness(registry=registry)
    v1 = pipeline_version(1, step_version(1))
    with pytest.raises(NotRegisteredError, match="version 3 is not registered"):
        harness.create(v1, version=3)
    assert harness.orchestrator.list_pipelines() == []
