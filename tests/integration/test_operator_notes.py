"""Who acted and why (issue #29 item 7): cancel, retry and rerun record an operator's ``actor``
and ``reason`` in the history event they write, and a retry keeps the errors it clears (with
their tracebacks) in its ``pipeline.retried`` event. Memory, SQLite, PostgreSQL, TinyDB, and
the CLI's ``--reason`` on a SQLite file."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from prorch import FakeClock, InvalidParamsError, Orchestrator, Status
from prorch.cli.commands import main
from prorch.model.registry import Registry
from prorch.model.status import EventType
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of

ATTEMPTS: list[int] = []


def fetch(step: Any) -> None:
    step.finish({"n": 1})


def flaky(step: Any) -> None:
    ATTEMPTS.append(1)
    if len(ATTEMPTS) <= 2:
        raise RuntimeError(f"upstream down (call {len(ATTEMPTS)})")
    step.finish({"ok": True})


def hold(step: Any) -> None:
    step.wait(seconds=3600)


@pytest.fixture(params=["memory", "sqlite", "postgresql", "tinydb"])
def orchestrator(request: pytest.FixtureRequest, tmp_path: Path, registry: Registry) -> Any:
    ATTEMPTS.clear()
    pipeline_of(step_of("Fetch", fetch), step_of("Flaky", flaky, max_attempts=1), name="Sync")
    pipeline_of(step_of("Fetch", fetch), step_of("Hold", hold, hold), name="Slow")
    backend = make_backend(request.param, tmp_path, request)
    yield Orchestrator(backend, registry=registry, clock=FakeClock())
    if hasattr(backend, "dispose"):
        backend.dispose()


def run_a_while(orchestrator: Orchestrator, uuid: str) -> Status:
    for _ in range(5):
        orchestrator.execute_pipelines()
    return orchestrator.get(uuid).pipeline.status


def events(orchestrator: Orchestrator, uuid: str, kind: EventType) -> list[dict[str, Any]]:
    return [dict(e.data) for e in orchestrator.history(uuid) if e.type == kind]


def test_retry_records_who_and_why_and_keeps_every_earlier_error(orchestrator: Orchestrator) -> None:
    uuid = orchestrator.registry.pipeline("Sync").create(orchestrator.store.backend, {}, clock=orchestrator.clock).uuid
    assert run_a_while(orchestrator, uuid) == Status.FAILED
    orchestrator.retry(uuid, actor="alice", reason="upstream is back")
    assert orchestrator.get(uuid).steps[1].error is None  # the step starts afresh...
    assert run_a_while(orchestrator, uuid) == Status.FAILED
    orchestrator.retry(uuid)  # the old signature still works
    assert run_a_while(orchestrator, uuid) == Status.FINISHED

    first, second = events(orchestrator, uuid, EventType.PIPELINE_RETRIED)
    assert first["actor"] == "alice" and first["reason"] == "upstream is back"
    assert "actor" not in second and "reason" not in second
    for data, call in ((first, 1), (second, 2)):  # ...and the history keeps what it cleared
        [error] = data["errors"]
        assert error["step"] == "Flaky" and error["type"] == "RuntimeError"
        assert error["message"] == f"upstream down (call {call})"
        assert "Traceback" in error["traceback"] and f"upstream down (call {call})" in error["traceback"]


def test_cancel_and_rerun_record_who_and_why(orchestrator: Orchestrator) -> None:
    slow = orchestrator.registry.pipeline("Slow")
    uuid = slow.create(orchestrator.store.backend, {}, clock=orchestrator.clock).uuid
    run_a_while(orchestrator, uuid)
    orchestrator.cancel(uuid, actor="dashboard", reason="wrong customer")
    [cancelled] = events(orchestrator, uuid, EventType.PIPELINE_CANCELLED)
    assert cancelled == {"actor": "dashboard", "reason": "wrong customer"}

    new = orchestrator.rerun(uuid, "Hold", actor="bob", reason="try again").pipeline
    [told] = events(orchestrator, uuid, EventType.PIPELINE_RERUN)
    assert told == {"rerun_uuid": new.uuid, "from_step": "Hold", "actor": "bob", "reason": "try again"}
    [created] = events(orchestrator, new.uuid, EventType.PIPELINE_CREATED)
    assert created["actor"] == "bob" and created["reason"] == "try again"

    # a live original cancelled by the rerun: the cancel carries them too
    run_a_while(orchestrator, new.uuid)
    newer = orchestrator.rerun(new.uuid, "Hold", cancel_original=True, actor="bob", reason="stuck").pipeline
    assert events(orchestrator, new.uuid, EventType.PIPELINE_CANCELLED) == [{"actor": "bob", "reason": "stuck"}]
    assert events(orchestrator, newer.uuid, EventType.PIPELINE_CREATED)[0]["reason"] == "stuck"


def test_a_cancel_request_to_a_held_pipeline_records_who_and_why(orchestrator: Orchestrator) -> None:
    uuid = orchestrator.registry.pipeline("Slow").create(orchestrator.store.backend, {}, clock=orchestrator.clock).uuid
    now = orchestrator.clock.now()
    assert orchestrator.store.claim_one(uuid, now, "another-worker", now + timedelta(seconds=60)) is not None
    orchestrator.cancel(uuid, actor="carol", reason="duplicate")
    [requested] = events(orchestrator, uuid, EventType.PIPELINE_CANCEL_REQUESTED)
    assert requested["actor"] == "carol" and requested["reason"] == "duplicate"


@pytest.mark.parametrize(
    ("note", "says"),
    [({"reason": 42}, "reason must be a text"), ({"actor": "x" * 1001}, "actor must be a text of at most 1000")],
)
def test_a_bad_actor_or_reason_is_refused_and_nothing_changes(
    orchestrator: Orchestrator, note: dict[str, Any], says: str
) -> None:
    uuid = orchestrator.registry.pipeline("Sync").create(orchestrator.store.backend, {}, clock=orchestrator.clock).uuid
    assert run_a_while(orchestrator, uuid) == Status.FAILED
    before = len(orchestrator.history(uuid))
    for act in (orchestrator.retry, orchestrator.cancel):
        with pytest.raises(InvalidParamsError, match=says):
            act(uuid, **note)
    with pytest.raises(InvalidParamsError, match=says):
        orchestrator.rerun(uuid, "Flaky", **note)
    assert orchestrator.get(uuid).pipeline.status == Status.FAILED
    assert len(orchestrator.history(uuid)) == before
    assert len(orchestrator.list_pipelines()) == 1


def test_the_cli_records_its_reason_with_the_actor_cli(tmp_path: Path, registry: Registry) -> None:
    """In its own registry: the CLI imports the app into the current one, where an earlier test's
    step named Wait may be."""
    app = tmp_path / "notes_app.py"
    app.write_text(
        "from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step\n"
        "@register_step\nclass Wait(OnStartMixin, Step):\n    name = 'Wait'\n"
        "    def on_start(self):\n        self.wait(seconds=3600)\n"
        "@register_pipeline\nclass Waits(Pipeline):\n    name = 'Waits'\n    steps = [Wait]\n"
    )
    base = ["--repository", f"sqlite:///{tmp_path / 'notes.db'}", "--app", "notes_app"]
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        uuid = runner.invoke(main, [*base, "start", "Waits"], catch_exceptions=False).stdout.strip()
        result = runner.invoke(main, [*base, "cancel", uuid, "--reason", "not needed"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        shown = json.loads(runner.invoke(main, [*base, "show", uuid, "--json"], catch_exceptions=False).stdout)
        printed = runner.invoke(main, [*base, "show", uuid], catch_exceptions=False).stdout
        patch.delitem(sys.modules, "notes_app", raising=False)
    [event] = [e for e in shown["history"] if e["type"] == "pipeline.cancelled"]
    assert event["data"] == {"actor": "cli", "reason": "not needed"}
    assert "pipeline.cancelled by cli: not needed" in printed
