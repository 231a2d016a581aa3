"""``self.progress()`` is stored while the hook still runs (``HookRuntime.progress_now``): at
most every half second, only while the worker holds the lease, never failing the hook; the last
report is stored with the transition. A user's four-method repository keeps it for the
transition."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from prorch import FakeClock, Orchestrator
from prorch.engine import runtime as hook_runtime
from prorch.model.registry import Registry
from prorch.storage.store import store_for
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of
from tests.support.leases import take_lease
from tests.support.processes import PRORCH, child_env, wait_for

LIVE = ["sqlite", "postgresql", "memory", "tinydb"]


def counted_writes(backend: Any, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The progress each live write stored (the backend's own ``write_progress``, counted)."""
    engine = store_for(backend).engine
    written: list[dict[str, Any]] = []
    real = engine.write_progress

    def counting(pipeline_uuid: str, step_uuid: str, token: str | None, progress: dict[str, Any]) -> bool:
        stored = bool(real(pipeline_uuid, step_uuid, token, progress))
        if stored:
            written.append(progress)
        return stored

    monkeypatch.setattr(engine, "write_progress", counting)
    return written


def current_progress(orchestrator: Orchestrator, uuid: str) -> Any:
    return orchestrator.get(uuid).steps[0].progress


@pytest.mark.parametrize("kind", LIVE)
def test_progress_is_seen_while_the_hook_runs_and_a_tight_loop_writes_a_handful_of_times(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend(kind, tmp_path, request)
    written = counted_writes(backend, monkeypatch)
    reader = Orchestrator(backend, registry=registry)  # another reader's view, in the hook
    seen: list[Any] = []
    took: list[float] = []

    def loop(self: Any) -> None:
        started = time.monotonic()
        self.progress(0, 10_000, note="starting")
        seen.append(current_progress(reader, self.pipeline_uuid))
        for done in range(1, 10_001):
            self.progress(done, 10_000)
        took.append(time.monotonic() - started)
        self.finish()

    uuid = pipeline_of(step_of("Loop", loop), name="Job").create(backend, {}).uuid
    orchestrator = Orchestrator(backend, registry=registry, clock=FakeClock())
    orchestrator.execute_pipelines()
    assert seen and seen[0]["note"] == "starting" and seen[0]["done"] == 0  # stored before the hook returned
    bound = 1 + int(took[0] / hook_runtime.PROGRESS_EVERY) + 1
    assert 1 <= len(written) <= bound, (len(written), took)  # not 10,001: one write per half second at most
    state = orchestrator.get(uuid)
    assert state.pipeline.status.value == "finished"  # the live writes did not make the transition's CAS fail
    assert state.steps[0].progress["done"] == 10_000  # the last report, stored with the transition


@pytest.mark.parametrize("kind", LIVE)
def test_a_hook_whose_lease_is_lost_writes_no_progress_and_does_not_fail(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend(kind, tmp_path, request)
    written = counted_writes(backend, monkeypatch)
    store = store_for(backend)
    reader = Orchestrator(backend, registry=registry)
    after: list[Any] = []

    def stolen(self: Any) -> None:
        take_lease(store, self.pipeline_uuid)
        self.progress(1, 2, note="too late")  # refused: logged, not raised
        after.append(current_progress(reader, self.pipeline_uuid))
        self.finish()

    uuid = pipeline_of(step_of("Stolen", stolen), name="Job").create(backend, {}).uuid
    Orchestrator(backend, registry=registry, clock=FakeClock()).execute_pipelines()
    assert after == [None]  # the hook went on past progress(); nothing was stored
    assert written == []
    assert current_progress(reader, uuid) is None  # its transition was refused too (the lease is lost)


def test_a_four_method_repository_stores_progress_with_the_transition(
    tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend("seed", tmp_path, request)
    reader = Orchestrator(backend, registry=registry)
    seen: list[Any] = []

    def report(self: Any) -> None:
        self.progress(1, 2)
        seen.append(current_progress(reader, self.pipeline_uuid))
        self.finish()

    uuid = pipeline_of(step_of("Report", report), name="Job").create(backend, {}).uuid
    Orchestrator(backend, registry=registry, clock=FakeClock()).execute_pipelines()
    assert seen == [None]
    assert current_progress(reader, uuid)["done"] == 1


@pytest.mark.slow
def test_a_worker_process_shows_progress_while_its_hook_runs(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    """A real ``prorch worker`` runs a hook that reports progress, then blocks on a file: this
    process reads the progress (``Orchestrator.get``, ``prorch show``) while the hook runs; then
    the hook finishes and its last report is stored with its transition."""
    (tmp_path / "prorch.toml").write_text('repository = "sqlite:///jobs.db"\napp = ["fault_app"]\n')
    log, gate = tmp_path / "log", tmp_path / "go"
    started = subprocess.run(
        [PRORCH, "start", "Reporting"], cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 0, started.stderr
    uuid = started.stdout.strip()
    worker = subprocess.Popen(
        [PRORCH, "worker", "--interval", "0.2"], cwd=tmp_path,
        env=child_env(FAULT_LOG=str(log), PROGRESS_GATE=str(gate)), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    processes.append(worker)
    wait_for(lambda: log.exists() and "reporting" in log.read_text(), 30, "the hook to report and block")
    orchestrator = Orchestrator(f"sqlite:///{tmp_path / 'jobs.db'}")
    state = orchestrator.get(uuid)
    assert state.pipeline.lease_owner and state.pipeline.status.value != "finished"  # its hook still runs
    assert state.steps[0].progress is not None
    assert (state.steps[0].progress["done"], state.steps[0].progress["note"]) == (1, "first")
    shown = subprocess.run(
        [PRORCH, "show", uuid], cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "progress: 1/3 (33%) first" in shown.stdout
    gate.touch()
    wait_for(lambda: orchestrator.get(uuid).pipeline.status.value == "finished", 30, "the hook to finish")
    final = orchestrator.get(uuid).steps[0].progress
    assert (final["done"], final["note"]) == (3, "done")
