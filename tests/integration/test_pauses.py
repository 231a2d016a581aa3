"""Pause and resume (issue #29 item 3): a paused class (every version or one), tenant or pipeline
is not claimed, on every backend and the four-method repository's fallback; pipelines created
while paused wait too; resuming makes the work due at once; a pipeline's own pause is in its
history with who and why."""

from __future__ import annotations

import json
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from prorch import FakeClock, InvalidParamsError, Orchestrator, Status
from prorch.cli.commands import main
from prorch.model.exceptions import ConfigurationError, InvalidStateError
from prorch.model.registry import Registry
from prorch.model.status import EventType
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of


def work(step: Any) -> None:
    step.finish({})


@pytest.fixture(params=["memory", "sqlite", "postgresql", "tinydb", "seed", "docs-example"])
def orchestrator(request: pytest.FixtureRequest, tmp_path: Path, registry: Registry) -> Any:
    pipeline_of(step_of("Work", work), name="Job")
    pipeline_of(step_of("Work2", work), name="Job", version=2)
    pipeline_of(step_of("Other", work), name="Other")
    backend = make_backend(request.param, tmp_path, request)
    yield Orchestrator(backend, registry=registry, clock=FakeClock())
    if hasattr(backend, "dispose"):
        backend.dispose()


def create(orchestrator: Orchestrator, name: str, version: int | None = None, tenant: str | None = None) -> str:
    pipeline = orchestrator.registry.pipeline(name, version)
    return pipeline.create(orchestrator.store.backend, {}, clock=orchestrator.clock, tenant=tenant).uuid


def status(orchestrator: Orchestrator, uuid: str) -> Status:
    return orchestrator.get(uuid).pipeline.status


def test_a_paused_class_tenant_or_pipeline_is_not_claimed_until_resumed(orchestrator: Orchestrator) -> None:
    job1, job2, other = create(orchestrator, "Job", 1), create(orchestrator, "Job", 2), create(orchestrator, "Other")
    acme, solo = create(orchestrator, "Other", tenant="acme"), create(orchestrator, "Other")
    orchestrator.pause(name="Job", version=1, actor="alice", reason="bad deploy")
    orchestrator.pause(tenant="acme")
    orchestrator.pause(uuid=solo)
    late = create(orchestrator, "Job", 1)  # created while its class is paused: it waits too

    summary = orchestrator.execute_pipelines()
    assert summary.claimed == 2
    finished = {u for u in (job1, job2, other, acme, solo, late) if status(orchestrator, u) == Status.FINISHED}
    assert finished == {job2, other}
    assert {p.label() for p in orchestrator.pauses()} == {"class Job v1", "tenant acme", f"pipeline {solo}"}
    assert orchestrator.store.due(orchestrator.clock.now(), 10) == []

    resumed = orchestrator.resume(name="Job", version=1)
    assert (resumed.actor, resumed.reason) == ("alice", "bad deploy")
    orchestrator.resume(tenant="acme")
    orchestrator.resume(uuid=solo, actor="bob")
    assert orchestrator.pauses() == []
    assert orchestrator.execute_pipelines().claimed == 4  # due at once: no wait for a timer
    assert all(status(orchestrator, u) == Status.FINISHED for u in (job1, acme, solo, late))

    kinds = (EventType.PIPELINE_PAUSED, EventType.PIPELINE_RESUMED)
    paused, resumed_event = [e for e in orchestrator.history(solo) if e.type in kinds]
    assert paused.type == EventType.PIPELINE_PAUSED and resumed_event.data == {"actor": "bob"}


def test_a_class_paused_in_every_version_and_the_errors(orchestrator: Orchestrator) -> None:
    job1, job2 = create(orchestrator, "Job", 1), create(orchestrator, "Job", 2)
    orchestrator.pause(name="Job")
    assert orchestrator.execute_pipelines().claimed == 0
    with pytest.raises(InvalidStateError, match="paused already"):
        orchestrator.pause(name="Job", reason="again")
    with pytest.raises(InvalidStateError, match="class Job v2 is not paused"):
        orchestrator.resume(name="Job", version=2)
    with pytest.raises(InvalidParamsError, match="exactly one scope"):
        orchestrator.pause(name="Job", tenant="acme")
    with pytest.raises(InvalidParamsError, match="exactly one scope"):
        orchestrator.pause()
    orchestrator.resume(name="Job")
    assert orchestrator.execute_pipelines().claimed == 2
    assert status(orchestrator, job1) == status(orchestrator, job2) == Status.FINISHED
    with pytest.raises(InvalidStateError, match="nothing to pause"):
        orchestrator.pause(uuid=job1)


def test_held_pipelines_show_as_paused_max_running_or_rate_limited_not_due(
    orchestrator: Orchestrator, registry: Registry
) -> None:
    pipeline_of(step_of("Capped", work), name="Capped", max_running=1)
    pipeline_of(step_of("Rated", work), name="Rated", rate_limit="1/hour")
    job = create(orchestrator, "Job", 1)
    orchestrator.pause(name="Job", reason="maintenance")
    rated = [create(orchestrator, "Rated") for _ in range(2)]
    orchestrator.execute_pipelines()  # one of the rated runs: the rate is spent for the hour
    capped = [create(orchestrator, "Capped") for _ in range(2)]
    now = orchestrator.clock.now()
    leased = orchestrator.store.claim_one(capped[0], now, "w:1", now + timedelta(seconds=60))
    limits_kept = sum(status(orchestrator, u) == Status.FINISHED for u in rated) == 1  # docs-example: no limits
    holds_leases = leased is not None and leased.lease_expires_at is not None  # a seed repository: no leases

    def found(state: str) -> set[str]:
        return {p.uuid for p in orchestrator.query(state=state, count=True).pipelines}

    assert found("paused") == {job}
    [waiting_rated] = [u for u in rated if status(orchestrator, u) != Status.FINISHED] if limits_kept else [None]
    assert found("rate-limited") == ({waiting_rated} if limits_kept else set())
    assert found("max-running") == ({capped[1]} if holds_leases else set())
    assert found("running") == ({capped[0]} if holds_leases else set())
    expected_due = {u for u in (*rated, *capped) if status(orchestrator, u) == Status.PENDING}
    expected_due -= found("rate-limited") | found("max-running") | found("running")
    assert found("due") == expected_due

    holds = orchestrator.holds()
    pause = holds.pause_of(orchestrator.get(job).pipeline)
    assert pause is not None and pause.describe() == "paused (class Job, maintenance)"
    if limits_kept:
        assert holds.limited["Rated"].why == "rate_limit 1 per 3600s of Rated: 1 started"


def test_the_cli_pauses_lists_shows_and_resumes(tmp_path: Path, registry: Registry) -> None:
    """In its own registry: the CLI imports the app into the current one."""
    (tmp_path / "pause_app.py").write_text(
        "from prorch import Pipeline, Step, register_pipeline, register_step\n"
        "@register_step\nclass Do(Step):\n    name = 'Do'\n    def on_start(self):\n        self.finish({})\n"
        "@register_pipeline\nclass Nightly(Pipeline):\n    name = 'Nightly'\n    steps = [Do]\n"
        "@register_step\nclass Copy(Step):\n    name = 'Copy'\n    def on_start(self):\n"
        "        self.progress(3, 10, 'copying')\n        self.wait(seconds=3600)\n"
        "    def on_continue(self):\n        self.wait(seconds=3600)\n"
        "@register_pipeline\nclass Copies(Pipeline):\n    name = 'Copies'\n    steps = [Copy]\n"
    )
    base = ["--repository", f"sqlite:///{tmp_path / 'pause.db'}", "--app", "pause_app"]
    runner = CliRunner()

    def cli(*args: str, code: int = 0) -> str:
        result = runner.invoke(main, [*base, *args], catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.stdout if code == 0 else result.output

    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        uuid = cli("start", "Nightly").strip()
        assert cli("pause", "--class", "Nightly", "--reason", "db migration") == "paused class Nightly\n"
        assert "already" in cli("pause", "--class", "Nightly", code=1)
        assert "exactly one scope" in cli("pause", "--class", "Nightly", "--tenant", "acme", code=2)
        assert "class Nightly" in cli("pauses") and "by cli: db migration" in cli("pauses")
        assert "claimed 0" in cli("run")
        listed = cli("list", "--state", "paused")
        assert uuid in listed and "paused (class Nightly, by cli: db migration)" in listed
        assert "0 shown of 0 matching" in cli("list", "--state", "due")
        shown = json.loads(cli("show", uuid, "--json"))
        assert shown["state"] == "paused" and shown["held"] == "paused (class Nightly, by cli: db migration)"
        assert shown["next_run"]["reason"] == shown["held"]  # not "due now"
        printed = cli("show", uuid)
        assert "next run:" in printed and "(paused (class Nightly, by cli: db migration))" in printed
        assert "due now" not in printed
        assert cli("resume", "--class", "Nightly").startswith("resumed class Nightly (paused since ")
        assert "nothing is paused" in cli("pauses")
        assert "claimed 1" in cli("run")
        assert "PROGRESS" not in cli("list")  # no live pipeline reported any
        copying = cli("start", "Copies").strip()
        cli("run")
        listed = cli("list")
        assert "PROGRESS" in listed and "3/10 (30%) copying" in listed
        [row] = [p for p in json.loads(cli("list", "--json"))["pipelines"] if p["uuid"] == copying]
        assert row["progress"]["done"] == 3 and row["state"] == "waiting"
        patch.delitem(sys.modules, "pause_app", raising=False)


def test_seams_limits_skip_a_paused_pipeline_and_purge_forgets_its_pause(
    orchestrator: Orchestrator,
) -> None:
    pipeline_of(step_of("Capped", work), name="Capped", max_running=1)
    first, second = create(orchestrator, "Capped"), create(orchestrator, "Capped")
    orchestrator.pause(uuid=first)
    assert orchestrator.execute_pipelines().claimed == 1  # the paused one takes no max_running slot
    assert status(orchestrator, second) == Status.FINISHED and status(orchestrator, first) == Status.PENDING

    orchestrator.cancel(first)  # a paused pipeline may still be cancelled, then purged with its pause
    orchestrator.clock.advance(3600)  # type: ignore[attr-defined]
    orchestrator.pause(name="Other")
    try:
        orchestrator.store.deleters()
    except ConfigurationError:
        return  # a four-method repository without delete_by: no retention
    assert orchestrator.purge(timedelta(seconds=60)).pipelines == 2
    assert [p.label() for p in orchestrator.pauses()] == ["class Other"]


RELEASE = threading.Event()
ENTERED = threading.Event()


def blocking(step: Any) -> None:
    ENTERED.set()
    assert RELEASE.wait(30)
    step.finish({})


def test_pause_while_a_hook_runs_lets_it_finish_and_holds_the_next_step(orchestrator: Orchestrator) -> None:
    ENTERED.clear()
    RELEASE.clear()
    pipeline_of(step_of("Block", blocking), step_of("After", work), name="Two")
    uuid = create(orchestrator, "Two")
    passing = threading.Thread(target=orchestrator.execute_pipelines)
    passing.start()
    assert ENTERED.wait(30)
    orchestrator.pause(name="Two", reason="hold on")
    RELEASE.set()
    passing.join(30)
    steps = orchestrator.get(uuid).steps
    assert [s.status for s in steps] == [Status.FINISHED, Status.CREATED]  # the hook finished, the next waits
    assert orchestrator.query(state="paused").pipelines[0].uuid == uuid
    assert orchestrator.execute_pipelines().claimed == 0
    orchestrator.resume(name="Two")
    assert orchestrator.execute_pipelines().claimed == 1
    assert status(orchestrator, uuid) == Status.FINISHED


def test_the_metrics_split_held_pipelines_from_due_ones(registry: Registry) -> None:
    pytest.importorskip("prometheus_client")
    from prorch.observability.metrics import StoreGauges

    pipeline_of(step_of("Work", work), name="Job")
    orchestrator = Orchestrator("memory://", registry=registry, clock=FakeClock())
    for _ in range(3):
        create(orchestrator, "Job")
    create(orchestrator, "Job", tenant="acme")

    def gauges() -> dict[tuple[str, str], float]:
        found = {}
        for family in StoreGauges(orchestrator).collect():
            for sample in family.samples:
                found[(sample.name, sample.labels.get("state", ""))] = sample.value
        return found

    assert gauges()[("prorch_pipelines_due", "")] == 4 and gauges()[("prorch_pipelines_held", "paused")] == 0
    orchestrator.pause(tenant="acme")
    assert gauges()[("prorch_pipelines_due", "")] == 3 and gauges()[("prorch_pipelines_held", "paused")] == 1
