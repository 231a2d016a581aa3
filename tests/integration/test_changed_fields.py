"""The engine writes only the fields a transition changed (issue #13): what it leaves out must be
exactly what the store already holds, on every backend that takes partial writes."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from prorch import FakeClock, Orchestrator, Status
from prorch.model.exceptions import ConcurrentUpdateError
from prorch.storage.store import Store
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of

PARTIAL = ["memory", "sqlite", "postgresql", "tinydb"]


def _stored_pipeline(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Store, str]:
    backend = make_backend(kind, tmp_path, request)
    waits = pipeline_of(step_of("Wait", on_start=lambda step: None, on_continue=lambda step: step.wait(seconds=60)))
    uuid = waits.create(backend, {}).uuid
    store = Store(backend)
    assert store.partial_update, f"{kind} should take partial writes"
    return store, uuid


@pytest.mark.parametrize("kind", PARTIAL)
def test_a_nested_value_changed_in_place_is_written(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store, uuid = _stored_pipeline(kind, tmp_path, request)
    record = store.get_pipeline(uuid)
    assert record is not None
    stored = store.tracking([record])
    record.metadata["job"] = {"polls": 1, "ids": [1]}
    store.commit([record], snapshots=stored)

    again = store.get_pipeline(uuid)
    assert again is not None
    stored = store.tracking([again])
    again.metadata["job"]["polls"] += 1  # in place: the loaded record shares nothing with its snapshot
    again.metadata["job"]["ids"].append(2)
    store.commit([again], snapshots=stored)
    again.metadata["job"]["polls"] += 1  # and once more on the same record, after its write
    store.commit([again], snapshots=stored)

    stored = store.get_pipeline(uuid)
    assert stored is not None
    assert stored.metadata["job"] == {"polls": 3, "ids": [1, 2]}


@pytest.mark.parametrize("kind", PARTIAL)
@pytest.mark.parametrize(("before", "after"), [(1, True), (1, 1.0), (0, False), ({"a": 1}, {"a": True})])
def test_a_change_python_calls_equal_is_written(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, before: Any, after: Any
) -> None:
    store, uuid = _stored_pipeline(kind, tmp_path, request)
    record = store.get_pipeline(uuid)
    assert record is not None
    stored = store.tracking([record])
    record.metadata["value"] = before
    store.commit([record], snapshots=stored)
    record.metadata["value"] = after  # == before in Python, but not the same JSON
    store.commit([record], snapshots=stored)

    stored = store.get_pipeline(uuid)
    assert stored is not None
    assert repr(stored.metadata["value"]) == repr(after)


@pytest.mark.parametrize("kind", PARTIAL)
def test_fields_a_write_did_not_change_keep_what_is_stored(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """An outside update of one field (the seed's ``update``, no revision bump) survives the
    engine's next write of other fields: with whole-row writes it was overwritten."""
    store, uuid = _stored_pipeline(kind, tmp_path, request)
    record = store.get_pipeline(uuid)
    assert record is not None
    stored = store.tracking([record])
    store.pipelines.update(uuid, {"priority": 7})
    record.metadata["note"] = "engine"
    store.commit([record], snapshots=stored)

    stored = store.get_pipeline(uuid)
    assert stored is not None
    assert (stored.priority, stored.metadata["note"]) == (7, "engine")


@pytest.mark.parametrize("kind", PARTIAL)
def test_a_refused_write_is_written_whole_after_a_reload(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A write refused by compare-and-set changes nothing, and the record's snapshot stays
    what the store held: the next write still sends the change."""
    store, uuid = _stored_pipeline(kind, tmp_path, request)
    mine = store.get_pipeline(uuid)
    theirs = store.get_pipeline(uuid)
    assert mine is not None and theirs is not None
    my_snapshots, their_snapshots = store.tracking([mine]), store.tracking([theirs])
    theirs.metadata["by"] = "them"
    store.commit([theirs], snapshots=their_snapshots)
    mine.metadata["by"] = "me"
    revision, kept = mine.revision, dict(my_snapshots or {})
    with pytest.raises(ConcurrentUpdateError):
        store.commit([mine], snapshots=my_snapshots)
    assert mine.revision == revision and my_snapshots == kept  # a refused write touches nothing

    fresh = store.get_pipeline(uuid)
    assert fresh is not None and fresh.metadata["by"] == "them"
    stored = store.tracking([fresh])
    fresh.metadata["by"] = "me"
    store.commit([fresh], snapshots=stored)
    stored = store.get_pipeline(uuid)
    assert stored is not None and stored.metadata["by"] == "me"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "tinydb"])
def test_a_pipeline_runs_to_its_end_with_partial_writes(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    def poll(step: Any) -> None:
        job = step.metadata.setdefault("job", {"polls": 0})
        job["polls"] += 1
        if job["polls"] == 3:
            step.finish(output={"polls": job["polls"]})

    backend = make_backend(kind, tmp_path, request)
    polls = pipeline_of(step_of("Poll", on_start=lambda step: None, on_continue=poll), name="Polls")
    uuid = polls.create(backend, {}).uuid
    orchestrator = Orchestrator(backend)
    for _ in range(3):
        orchestrator.execute_pipelines()
    state = orchestrator.get(uuid)
    assert state.pipeline.status == Status.FINISHED
    assert state.steps[0].metadata["job"] == {"polls": 3}
    assert state.steps[0].output == {"polls": 3}


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_the_two_instants_of_a_repeated_local_hour_are_stored_apart(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Regression (review of the cached timestamps): 02:30 in Paris on 2030-10-27 is two instants
    (00:30 and 01:30 UTC, ``fold`` 0 and 1) whose datetimes compare and hash equal; a cache keyed
    by the datetime stored the second as the first's instant. Two pipelines wait until each."""
    backend = make_backend(kind, tmp_path, request)
    paris = ZoneInfo("Europe/Paris")

    def until(step: Any) -> None:
        step.wait(until=datetime.fromisoformat(step.params["until"]).astimezone(paris))

    waits = pipeline_of(step_of("Wait", on_start=until, on_continue=lambda step: None), name="LocalWait")
    instants = ["2030-10-27T00:30:00+00:00", "2030-10-27T01:30:00+00:00"]
    assert [datetime.fromisoformat(i).astimezone(paris).fold for i in instants] == [0, 1]  # 02:30 both
    uuids = [waits.create(backend, {"until": instant}).uuid for instant in instants]
    clock = FakeClock(datetime(2030, 10, 26, 12, 0, tzinfo=timezone.utc))
    Orchestrator(backend, clock=clock).execute_pipelines()
    stored = [Store(backend).get_pipeline(uuid) for uuid in uuids]
    assert [r.next_run_at.isoformat() if r and r.next_run_at else None for r in stored] == instants
