"""The worker's claim while slow hooks run (``prorch.worker``): it runs in a thread of its own,
which reads the claimed pipelines' steps too, so that the loop waits for neither."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from prorch import Orchestrator
from prorch.model.records import StepRecord
from prorch.model.registry import Registry
from prorch.storage.store import Store
from repositories import MemoryBackend
from tests.support.builders import pipeline_of, quick, step_of


def test_while_a_slow_hook_runs_the_claim_thread_reads_the_claimed_steps(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#27's W4: the loop read the steps of each claim's pipelines (a round trip, 2-5 ms on
    PostgreSQL under load) while returned hooks waited for it. Three quick pipelines created
    while a slow hook runs: their steps are read by the claim's thread, not the loop."""
    readers: list[tuple[str, list[str]]] = []
    read = Store.steps_of_many

    def recorded(self: Store, uuids: Sequence[str]) -> dict[str, list[StepRecord]]:
        readers.append((threading.current_thread().name, list(uuids)))
        return read(self, uuids)

    monkeypatch.setattr(Store, "steps_of_many", recorded)
    started, gate = threading.Event(), threading.Event()
    slow = pipeline_of(step_of("Slow", on_start=lambda step: (started.set(), gate.wait(10))), name="Slow")
    quicks = pipeline_of(quick("Quick"), name="Quicks")
    backend = MemoryBackend()
    slow.create(backend, {})
    orchestrator = Orchestrator(backend, registry=registry, concurrency=4)
    worker = threading.Thread(target=orchestrator.run_forever, kwargs={"interval": 30.0})
    worker.start()
    try:
        assert started.wait(10)
        made = [created.uuid for created in quicks.create_many(backend, [{}] * 3)]
        deadline = time.monotonic() + 10
        while any(orchestrator.get(uuid).pipeline.status != "finished" for uuid in made):
            assert time.monotonic() < deadline, "the quick pipelines did not finish beside the slow hook"
            time.sleep(0.01)
    finally:
        gate.set()
        orchestrator.stop()
        worker.join(10)
    names = [name for name, uuids in readers if set(made) & set(uuids)]
    assert names and all(name.startswith("prorch-claim") for name in names), readers
