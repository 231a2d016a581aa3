"""The worker's claim while hooks run (``prorch.worker``): it runs in a thread of its own, which
reads the claimed pipelines' steps too, so that the loop waits for neither."""

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


@pytest.mark.parametrize("hooks", ["slow", "quick"])
def test_while_hooks_run_the_claim_thread_claims_and_reads_the_claimed_steps(
    hooks: str, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#27's W4 and paced pickup: the loop read the steps of each claim's pipelines (a round
    trip, 2-5 ms on PostgreSQL under load), and while hooks were quick it ran the claim itself
    (a commit: a quarter of its time at 200 creates a second), while returned hooks waited.
    Three pipelines created while a hook runs (slow; or quick: within a ``group_window`` of
    1 s, after a first quick hook): their steps are read by the claim's thread, not the loop."""
    readers: list[tuple[str, list[str]]] = []
    read = Store.steps_of_many

    def recorded(self: Store, uuids: Sequence[str]) -> dict[str, list[StepRecord]]:
        readers.append((threading.current_thread().name, list(uuids)))
        return read(self, uuids)

    monkeypatch.setattr(Store, "steps_of_many", recorded)
    started, gate = threading.Event(), threading.Event()
    held = pipeline_of(step_of("Held", on_start=lambda step: (started.set(), gate.wait(0.5))), name="Held")
    quicks = pipeline_of(quick("Quick"), name="Quicks")
    backend = MemoryBackend()
    window = {"slow": 0.005, "quick": 1.0}[hooks]
    orchestrator = Orchestrator(backend, registry=registry, concurrency=4, group_window=window)
    worker = threading.Thread(target=orchestrator.run_forever, kwargs={"interval": 30.0})
    worker.start()
    try:
        if hooks == "quick":  # one quick hook seen: hooks are quick until one takes the window
            finished(orchestrator, [quicks.create(backend, {}).uuid])
        held.create(backend, {})
        assert started.wait(10)
        made = [created.uuid for created in quicks.create_many(backend, [{}] * 3)]
        finished(orchestrator, made)
    finally:
        gate.set()
        orchestrator.stop()
        worker.join(10)
    names = [name for name, uuids in readers if set(made) & set(uuids)]
    assert names and all(name.startswith("prorch-claim") for name in names), readers


def finished(orchestrator: Orchestrator, uuids: list[str]) -> None:
    deadline = time.monotonic() + 10
    while any(orchestrator.get(uuid).pipeline.status != "finished" for uuid in uuids):
        assert time.monotonic() < deadline, "the pipelines did not finish"
        time.sleep(0.01)
