"""Run pipelines with group commit and count, per commit, the transitions that wrote a field:
how a test sees that two pipelines' writes of that field shared one commit."""

from __future__ import annotations

import time
from typing import Any

import pytest

from prorch import Orchestrator
from prorch.model.registry import Registry
from prorch.storage.store import Store


def run_grouped_counting(backend: Any, registry: Registry, monkeypatch: pytest.MonkeyPatch, field: str) -> list[int]:
    """Passes of a grouping orchestrator (concurrency 4, group_commit 8) until every stored
    pipeline has finished; returns, for each group commit, how many of its writes set ``field``."""
    rounds: list[int] = []
    commit_many = Store.commit_many

    def counted(self: Store, writes: Any) -> Any:
        rounds.append(sum(field in change.fields for write in writes for change in write.changes))
        return commit_many(self, writes)

    monkeypatch.setattr(Store, "commit_many", counted)
    grouped = Orchestrator(backend, registry=registry, concurrency=4, group_commit=8)
    for _ in range(100):  # the server's clock, read again, may put the newest one a moment ahead
        grouped.execute_pipelines()
        if all(p.status.value == "finished" for p in Store(backend).all_pipelines()):
            break
        time.sleep(0.02)
    return rounds
