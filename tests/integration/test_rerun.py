"""Rerun from a step (issue #29 item 1): a new pipeline of the same class and version reuses the
outputs of the original's steps before the named step, runs from it on (the hooks before it are
not called again), optionally with changed params; both histories say so; bad input stores
nothing; a live original is refused unless it is cancelled first; a purge of the original meanwhile
leaves no trace of the rerun. Memory, SQLite, PostgreSQL, TinyDB,
and the CLI on a SQLite file."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from prorch import FakeClock, InvalidParamsError, InvalidStateError, Orchestrator, PipelineNotFoundError, Status
from prorch.cli.commands import main
from prorch.model.registry import Registry
from prorch.model.status import EventType
from prorch.storage import forking
from prorch.storage.forking import FORKED_FROM
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of

CALLS: list[str] = []


def fetch(step: Any) -> None:
    CALLS.append(f"fetch:{step.params['x']}")
    step.finish({"n": step.params["x"] * 10})


def transform(step: Any) -> None:
    CALLS.append("transform")
    if step.params.get("broken"):
        step.fail("broken input")
        return
    step.finish({"n": step.outputs["Fetch"]["n"] + step.params.get("add", 1)})


def store_result(step: Any) -> None:
    CALLS.append("store")
    step.finish({"stored": step.outputs["Transform"]["n"]})


def hold(step: Any) -> None:
    step.wait(seconds=3600)


@pytest.fixture(params=["memory", "sqlite", "postgresql", "tinydb"])
def orchestrator(request: pytest.FixtureRequest, tmp_path: Path, registry: Registry) -> Any:
    CALLS.clear()
    pipeline_of(
        step_of("Fetch", fetch),
        step_of("Transform", transform, max_attempts=1),
        step_of("Store", store_result),
        name="Etl",
    )
    pipeline_of(step_of("First", fetch), step_of("Hold", hold, hold), name="Slow")
    backend = make_backend(request.param, tmp_path, request)
    yield Orchestrator(backend, registry=registry, clock=FakeClock())
    if hasattr(backend, "dispose"):
        backend.dispose()


def run_to_end(orchestrator: Orchestrator, uuid: str) -> None:
    for _ in range(10):
        orchestrator.execute_pipelines()
        if orchestrator.get(uuid).pipeline.status.value in ("finished", "failed", "cancelled"):
            return
    raise AssertionError(f"pipeline {uuid} did not end")


def test_a_failed_pipeline_reruns_from_its_failed_step_with_edited_params(orchestrator: Orchestrator) -> None:
    original = orchestrator.registry.pipeline("Etl").create(
        orchestrator.store.backend, {"x": 4, "broken": True}, clock=orchestrator.clock, tenant="acme"
    )
    run_to_end(orchestrator, original.uuid)
    assert orchestrator.get(original.uuid).pipeline.status == Status.FAILED
    CALLS.clear()

    state = orchestrator.rerun(original.uuid, "Transform", {"broken": False, "add": 2})
    new = state.pipeline
    assert new.uuid != original.uuid and new.status == Status.PENDING
    assert new.params == {"x": 4, "broken": False, "add": 2}
    assert new.metadata[FORKED_FROM] == {"uuid": original.uuid, "step": "Transform"}
    assert new.context.get("tenant") == "acme"
    assert [(s.name, s.status) for s in state.steps] == [
        ("Fetch", Status.FINISHED),
        ("Transform", Status.CREATED),
        ("Store", Status.CREATED),
    ]
    run_to_end(orchestrator, new.uuid)
    assert CALLS == ["transform", "store"]  # Fetch's hook was not called again
    assert orchestrator.result(new.uuid) == {"stored": 42}  # 4 * 10 from the reused output, + 2

    created = [e for e in orchestrator.history(new.uuid) if e.type == EventType.PIPELINE_CREATED]
    assert created[0].data[FORKED_FROM] == original.uuid and created[0].data["reused"] == ["Fetch"]
    told = [e for e in orchestrator.history(original.uuid) if e.type == EventType.PIPELINE_RERUN]
    assert [e.data for e in told] == [{"rerun_uuid": new.uuid, "from_step": "Transform"}]
    assert orchestrator.get(original.uuid).pipeline.status == Status.FAILED  # the original is left as it was


def test_a_finished_pipeline_reruns_from_its_first_step(orchestrator: Orchestrator) -> None:
    etl = orchestrator.registry.pipeline("Etl")
    original = etl.create(orchestrator.store.backend, {"x": 1}, clock=orchestrator.clock)
    run_to_end(orchestrator, original.uuid)
    CALLS.clear()
    new = orchestrator.rerun(original.uuid, "Fetch").pipeline
    run_to_end(orchestrator, new.uuid)
    assert CALLS == ["fetch:1", "transform", "store"]
    assert orchestrator.result(new.uuid) == orchestrator.result(original.uuid) == {"stored": 11}


@pytest.mark.parametrize(
    ("from_step", "params", "error", "says"),
    [
        ("Nope", None, InvalidParamsError, "rerun from one of: Fetch, Transform, Store"),
        ("Store", None, InvalidStateError, "step Transform of pipeline"),
        ("Transform", ["not", "a", "dict"], InvalidParamsError, "a dict of the fields to change"),
    ],
)
def test_bad_input_stores_nothing(
    orchestrator: Orchestrator, from_step: str, params: Any, error: type[Exception], says: str
) -> None:
    original = orchestrator.registry.pipeline("Etl").create(
        orchestrator.store.backend, {"x": 4, "broken": True}, clock=orchestrator.clock
    )
    run_to_end(orchestrator, original.uuid)  # Transform failed: Store never finished
    before = len(orchestrator.list_pipelines())
    with pytest.raises(error, match=says):
        orchestrator.rerun(original.uuid, from_step, params)
    assert len(orchestrator.list_pipelines()) == before
    assert not [e for e in orchestrator.history(original.uuid) if e.type == EventType.PIPELINE_RERUN]


def test_a_live_pipeline_is_refused_unless_cancelled_first(orchestrator: Orchestrator) -> None:
    slow = orchestrator.registry.pipeline("Slow")
    original = slow.create(orchestrator.store.backend, {"x": 2}, clock=orchestrator.clock)
    orchestrator.execute_pipelines()  # First finishes, Hold waits an hour
    with pytest.raises(InvalidStateError, match="cancel_original=True"):
        orchestrator.rerun(original.uuid, "Hold")
    assert orchestrator.get(original.uuid).pipeline.status == Status.PENDING
    with pytest.raises(InvalidParamsError):  # a bad rerun does not cancel the original either
        orchestrator.rerun(original.uuid, "Nope", cancel_original=True)
    assert orchestrator.get(original.uuid).pipeline.status == Status.PENDING

    new = orchestrator.rerun(original.uuid, "Hold", cancel_original=True).pipeline
    assert orchestrator.get(original.uuid).pipeline.status == Status.CANCELLED
    assert [s.status for s in orchestrator.get(new.uuid).steps] == [Status.FINISHED, Status.CREATED]


def test_the_cli_reruns_with_a_changed_param(tmp_path: Path, registry: Registry) -> None:
    app = tmp_path / "rerun_app.py"
    app.write_text(
        "from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step\n"
        "@register_step\n"
        "class Double(OnStartMixin, Step):\n"
        "    name = 'Double'\n"
        "    def on_start(self):\n"
        "        if self.params['x'] < 0:\n"
        "            self.fail('negative')\n"
        "        else:\n"
        "            self.finish({'y': self.params['x'] * 2})\n"
        "@register_pipeline\n"
        "class Doubler(Pipeline):\n"
        "    name = 'Doubler'\n"
        "    steps = [Double]\n"
    )
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    base = ["--repository", url, "--app", "rerun_app"]
    runner = CliRunner()
    env = {"PYTHONPATH": str(tmp_path)}
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        uuid = runner.invoke(main, [*base, "start", "Doubler", "-p", "x=-1"], env=env).stdout.strip()
        assert runner.invoke(main, [*base, "run"], env=env).exit_code == 0
        refused = runner.invoke(main, [*base, "rerun", uuid, "--from-step", "Missing"], env=env)
        assert refused.exit_code != 0 and "rerun from one of: Double" in refused.output
        done = runner.invoke(main, [*base, "rerun", uuid, "--from-step", "Double", "-p", "x=5", "--json"], env=env)
        assert done.exit_code == 0, done.output
        new = json.loads(done.stdout)
        assert new["params"] == {"x": 5} and new["metadata"][FORKED_FROM]["uuid"] == uuid
        assert runner.invoke(main, [*base, "run"], env=env).exit_code == 0
        shown = runner.invoke(main, [*base, "show", new["uuid"], "--json"], env=env)
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.stdout)["pipeline"]["status"] == "finished"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("rerun_app", None)


def test_a_rerun_whose_original_is_purged_meanwhile_stores_nothing(
    orchestrator: Orchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purge (another process's, say) deletes the original between the rerun's read and its
    write: the rerun is refused, and neither a new pipeline nor a ``pipeline.rerun`` event of
    the deleted pipeline is left behind."""
    store = orchestrator.store
    original = orchestrator.registry.pipeline("Etl").create(store.backend, {"x": 1}, clock=orchestrator.clock)
    run_to_end(orchestrator, original.uuid)
    planning = forking.plan_rerun

    def purged_meanwhile(*args: Any, **kwargs: Any) -> forking.RerunPlan:
        plan = planning(*args, **kwargs)
        orchestrator.clock.advance(60)  # type: ignore[attr-defined]
        assert orchestrator.purge(timedelta(seconds=1)).pipelines == 1
        return plan

    monkeypatch.setattr(forking, "plan_rerun", purged_meanwhile)
    with pytest.raises(PipelineNotFoundError, match=f"pipeline {original.uuid} was deleted"):
        orchestrator.rerun(original.uuid, "Transform")
    assert store.events_of(original.uuid) == []  # no event of a deleted pipeline
    assert store.all_pipelines() == []  # and no rerun


def test_purging_a_reruns_original_later_leaves_the_rerun_whole(orchestrator: Orchestrator) -> None:
    store = orchestrator.store
    original = orchestrator.registry.pipeline("Etl").create(store.backend, {"x": 1}, clock=orchestrator.clock)
    run_to_end(orchestrator, original.uuid)
    new = orchestrator.rerun(original.uuid, "Transform").pipeline
    orchestrator.clock.advance(60)  # type: ignore[attr-defined]
    assert orchestrator.purge(timedelta(seconds=1)).pipelines == 1  # the original only: the rerun is pending
    assert store.events_of(original.uuid) == [] and store.steps_of(original.uuid) == []
    run_to_end(orchestrator, new.uuid)
    assert orchestrator.result(new.uuid) == {"stored": 11}
    assert orchestrator.get(new.uuid).pipeline.metadata[FORKED_FROM]["uuid"] == original.uuid
