"""Sub-states (issue #29 item 4): a pending pipeline is listed and filtered as what it is now,
running (a live lease), due or waiting, by one rule in SQL and in the Python fallback, on every
backend; the CLI's list and show print it, ``stranded`` for a lease whose worker stopped."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from prorch import FakeClock, InvalidParamsError, Orchestrator
from prorch.model.registry import Registry
from prorch.model.substates import STATES
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of


def work(step: Any) -> None:
    if step.params.get("wait"):
        step.wait(seconds=3600)
    else:
        step.finish({})


@pytest.fixture(params=["memory", "sqlite", "postgresql", "tinydb", "seed", "docs-example"])
def orchestrator(request: pytest.FixtureRequest, tmp_path: Path, registry: Registry) -> Any:
    pipeline_of(step_of("Work", work, work), name="Job")
    backend = make_backend(request.param, tmp_path, request)
    yield Orchestrator(backend, registry=registry, clock=FakeClock())
    if hasattr(backend, "dispose"):
        backend.dispose()


def test_pending_splits_into_running_due_and_waiting(orchestrator: Orchestrator) -> None:
    job = orchestrator.registry.pipeline("Job")
    done = job.create(orchestrator.store.backend, {}, clock=orchestrator.clock).uuid
    waiting = job.create(orchestrator.store.backend, {"wait": True}, clock=orchestrator.clock).uuid
    orchestrator.execute_pipelines()
    orchestrator.clock.advance(1)  # type: ignore[attr-defined]
    due = job.create(orchestrator.store.backend, {}, clock=orchestrator.clock).uuid
    running = job.create(orchestrator.store.backend, {}, clock=orchestrator.clock).uuid
    now = orchestrator.clock.now()
    assert orchestrator.store.claim_one(running, now, "other-worker:token", now + timedelta(seconds=30)) is not None
    leased = orchestrator.get(running).pipeline.lease_expires_at is not None  # a seed repository has no leases

    found = {state: {p.uuid for p in orchestrator.query(state=state, count=True).pipelines} for state in STATES}
    assert found == {
        "running": {running} if leased else set(), "due": {due} if leased else {running, due}, "waiting": {waiting},
        "created": set(), "finished": {done}, "failed": set(), "cancelled": set(),
        "paused": set(), "max-running": set(), "rate-limited": set(),
    }  # fmt: skip
    assert orchestrator.query(state="due", count=True).total == (1 if leased else 2)
    assert orchestrator.query(state="waiting", name="Job", count=True).total == 1
    assert orchestrator.query(state="waiting", name="Other", count=True).total == 0

    orchestrator.clock.advance(31)  # type: ignore[attr-defined]  # the lease ran out: due again
    assert {p.uuid for p in orchestrator.query(state="due").pipelines} == {due, running}
    orchestrator.clock.advance(3600)  # type: ignore[attr-defined]  # the wait is over
    assert {p.uuid for p in orchestrator.query(state="due").pipelines} == {due, running, waiting}
    assert orchestrator.query(state="waiting").pipelines == []


def test_an_unknown_state_is_one_clear_error(orchestrator: Orchestrator) -> None:
    with pytest.raises(InvalidParamsError, match="state 'sleeping': use one of running, due, waiting"):
        orchestrator.query(state="sleeping")


def test_the_cli_lists_and_shows_the_state(tmp_path: Path, registry: Registry) -> None:
    import json

    from click.testing import CliRunner

    from prorch.cli.commands import main

    pipeline_of(step_of("Work", work, work), name="Job")
    url = f"sqlite:///{tmp_path / 'states.db'}"
    orchestrator = Orchestrator(url, registry=registry)
    waiting = orchestrator.registry.pipeline("Job").create(url, {"wait": True}).uuid
    orchestrator.execute_pipelines()
    due = orchestrator.registry.pipeline("Job").create(url, {}).uuid
    runner = CliRunner()
    listed = runner.invoke(main, ["-r", url, "list"])
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()[1:3]}
    assert rows == {waiting: "waiting", due: "due"}
    only = json.loads(runner.invoke(main, ["-r", url, "list", "--state", "waiting", "--json"]).stdout)
    assert [(p["uuid"], p["state"]) for p in only["pipelines"]] == [(waiting, "waiting")]
    shown = runner.invoke(main, ["-r", url, "show", waiting]).stdout
    assert f"{waiting}  pending (waiting)" in shown.splitlines()[0]
    bad = runner.invoke(main, ["-r", url, "list", "--state", "sleeping"])
    assert bad.exit_code == 2
