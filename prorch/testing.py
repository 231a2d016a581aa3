"""Helpers for testing your own pipelines: an in-memory repository, a fake clock, and a harness
that drives passes with no sleeping.

    from prorch.testing import Harness

    def test_backup():
        h = Harness()
        run = h.create(BackupAutomationPipeline, params={"path": "/data"})
        h.run_until_done(run.uuid)            # passes, moving the fake clock past each wait
        assert h.status(run.uuid) == "finished"
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from prorch.model.clock import FakeClock
from prorch.model.records import EventRecord
from prorch.model.registry import Registry, current_registry, isolated_registry
from prorch.model.status import TERMINAL
from prorch.orchestrator import Orchestrator
from prorch.pipeline import Pipeline
from prorch.storage import replay as replaying
from prorch.storage.replay import ReplayReport
from prorch.storage.repository import RepositoryLike
from prorch.storage.store import backends_package, store_for
from prorch.summaries import PassSummary

if TYPE_CHECKING:
    from repositories.memory import MemoryBackend

__all__ = ["FakeClock", "Harness", "MemoryBackend", "ReplayReport", "isolated_registry", "replay"]


def __getattr__(name: str) -> Any:
    """``MemoryBackend`` is re-exported lazily: prorch reaches backends only on demand."""
    if name == "MemoryBackend":
        backends_package()  # a clear error if an application's 'repositories' shadows prorch's
        from repositories.memory import MemoryBackend

        return MemoryBackend
    raise AttributeError(name)


class Harness:
    """An orchestrator on an in-memory backend (or ``repository``) driven by a fake clock."""

    def __init__(
        self,
        repository: RepositoryLike | None = None,
        *,
        clock: FakeClock | None = None,
        registry: Registry | None = None,
        **orchestrator_options: Any,
    ) -> None:
        backends_package()  # a clear error if an application's 'repositories' shadows prorch's
        from repositories.memory import MemoryBackend

        self.clock = clock or FakeClock()
        self.repository = repository if repository is not None else MemoryBackend()
        self.orchestrator = Orchestrator(self.repository, clock=self.clock, registry=registry, **orchestrator_options)

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the event loop of async hooks, if any ran."""
        self.orchestrator.close()

    def create(self, pipeline: type[Pipeline], params: Any = None, **options: Any) -> Pipeline:
        """``pipeline.create`` on this harness's repository and clock."""
        options.setdefault("registry", self.orchestrator.registry)
        return pipeline.create(self.repository, params, clock=self.clock, **options)

    def run_pass(self) -> PassSummary:
        return self.orchestrator.execute_pipelines()

    def drive(self, uuid: str, *, max_passes: int = 1000) -> str:
        """Run passes without moving the clock until the pipeline ends or waits (is not due
        now); returns its status. Use it to stop at each wait and check what the steps did."""
        for _ in range(max_passes):
            record = self.orchestrator.get(uuid).pipeline
            waiting = record.next_run_at is not None and record.next_run_at > self.clock.now()
            if record.status in TERMINAL or waiting:
                return record.status.value
            self.run_pass()
        raise AssertionError(f"pipeline {uuid} neither ended nor waited within {max_passes} passes")

    def run_until_done(self, uuid: str, *, max_passes: int = 1000) -> str:
        """Run passes until the pipeline ends, jumping the clock to its next due time between
        passes; returns its final status. Raises if it does not end within ``max_passes``."""
        for _ in range(max_passes):
            record = self.orchestrator.get(uuid).pipeline
            if record.status in TERMINAL:
                return record.status.value
            if record.next_run_at is not None and record.next_run_at > self.clock.now():
                self.clock.set(record.next_run_at)
            self.run_pass()
        raise AssertionError(f"pipeline {uuid} did not end within {max_passes} passes")

    def status(self, uuid: str) -> str:
        return self.orchestrator.get(uuid).pipeline.status.value

    def history(self, uuid: str) -> list[EventRecord]:
        return self.orchestrator.history(uuid)

    def event_types(self, uuid: str) -> list[str]:
        return [event.type.value for event in self.history(uuid)]


def replay(
    source: RepositoryLike | None = None,
    *,
    file: str | Path | None = None,
    registry: Registry | None = None,
    include_ended: bool = False,
) -> ReplayReport:
    """Check the recorded pipelines of a store (``source``: a URL or a repository) or of a file
    ``prorch export`` wrote (``file``) against the code registered now (``registry``, default
    the current one), and report per pipeline the first step this code would not run as
    recorded. Runs no hook and writes nothing (``prorch.storage.replay`` says why that is the
    check that matters in prorch). Live pipelines only, unless ``include_ended``."""
    if (source is None) == (file is None):
        raise TypeError("replay() takes a store (source=...) or an exported file (file=...), one of the two")
    chosen = registry if registry is not None else current_registry()
    if file is not None:
        return replaying.replay(replaying.from_export(file, include_ended=include_ended), chosen)
    return replaying.replay(replaying.from_store(store_for(source), include_ended=include_ended), chosen)
