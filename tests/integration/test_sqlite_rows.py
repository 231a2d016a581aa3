"""SQLite's per-transition statements on the driver, made without the record -> dict round
trip (#28 item 5), store exactly the rows of the dict path and SQLAlchemy's UPDATEs: the same
sample run, on the same clock and the same uuids, leaves identical tables either way."""

from __future__ import annotations

import itertools
import random
import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from prorch import FakeClock, Orchestrator, Status
from prorch.model import records
from prorch.model.records import ErrorInfo, EventRecord, MessageRecord, Record, StepRecord, StreamRecord
from prorch.model.status import EventType, RollbackState
from prorch.storage.composed import RepositoryBackend
from repositories.sql import SQLBackend, SQLRepository
from repositories.sqlite import SQLiteBackend, SQLiteRepository
from tests.support.builders import pipeline_of, step_of

TABLES = ("pipelines", "pipeline_steps", "pipeline_events", "pipeline_messages", "pipeline_stream")


@pytest.fixture
def same_uuids(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Makes ``new_uuid`` (and the retries' jitter) give the same sequence again each time it is called."""

    def restart() -> None:
        random.seed(28)
        counter = itertools.count()
        monkeypatch.setattr(records, "_urandom", lambda size: next(counter).to_bytes(size, "big"))

    return restart


def _sample_run(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Pipelines that make every kind of new row a run makes (events of every step verdict,
    messages, stream entries, errors), on a fake clock; every table's rows as stored."""
    clock = FakeClock(datetime(2030, 1, 1, tzinfo=timezone.utc))
    tries = {"count": 0}

    def flaky(step: Any) -> None:
        tries["count"] += 1
        if tries["count"] == 1:
            raise ValueError("first try fails \x00 with a NUL")
        step.finish({"tries": tries["count"], "big": 2**70, "when": "2030"})

    def talk(step: Any) -> None:
        step.metadata["seen"] = [1, 2.5, None, True]
        step.emit({"progress": 1})
        step.emit(7)

    def waits(step: Any) -> None:
        got = step.receive("go")
        if got is not None:
            step.finish(got)
        else:
            step.wait(seconds=3600)

    main = pipeline_of(
        step_of("Talk", on_start=talk),
        step_of("Flaky", on_start=flaky, max_attempts=3, retry_delay=1.0, retry_max_delay=1.0),
        step_of("Waits", on_start=lambda step: None, on_continue=waits),
        name="Main",
    )
    failing = pipeline_of(step_of("Fails", on_start=lambda step: step.fail("no")), name="Failing")
    backend = SQLBackend(f"sqlite:///{path}")
    orchestrator = Orchestrator(backend, clock=clock, concurrency=1, group_commit=10)
    uuid = main.create(backend, {"n": 1}, clock=clock).uuid
    failing.create(backend, {}, clock=clock)
    for _ in range(3):
        orchestrator.execute_pipelines()
        clock.advance(5)
    orchestrator.send(uuid, "go", {"payload": ["x", 1]})
    for _ in range(3):
        orchestrator.execute_pipelines()
        clock.advance(5)
    assert orchestrator.get(uuid).pipeline.status == Status.FINISHED
    backend.dispose()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE pipelines SET trace = NULL")  # the test run's own trace, if any
        return {table: connection.execute(f"SELECT * FROM {table} ORDER BY uuid").fetchall() for table in TABLES}


def test_a_run_stores_the_rows_the_dict_path_stored(
    tmp_path: Path, same_uuids: Callable[[], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    same_uuids()
    now = _sample_run(tmp_path / "new.db")
    assert len(now["pipeline_events"]) > 10 and now["pipeline_stream"] and now["pipeline_messages"]
    same_uuids()
    monkeypatch.setattr(SQLiteBackend, "save", RepositoryBackend.save)  # every new row through to_dict
    monkeypatch.setattr(SQLiteRepository, "compare_and_set", SQLRepository.compare_and_set)  # SQLAlchemy's UPDATEs
    before = _sample_run(tmp_path / "old.db")
    for table in TABLES:
        assert now[table] == before[table], table


def _records() -> Iterator[Record]:
    """Records of every class with the values that convert: times in other zones and None,
    enums, nested structs, big ints, scalar JSON, NUL in text."""
    berlin = datetime(2030, 3, 31, 1, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    utc = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
    for at in (utc, berlin, utc + timedelta(microseconds=1)):
        yield EventRecord(uuid="e", pipeline_uuid="p", step_uuid=None, type=EventType.STEP_STARTED, at=at, seq=3)
        yield EventRecord(
            uuid="e2", pipeline_uuid="p", step_uuid="s", type=EventType.STEP_FAILED, at=at, seq=1002,
            data={"error": "x\x00y", "n": 2**70, "f": 1.5, "nested": [{"a": None}], "when": at.isoformat()},
        )  # fmt: skip
        yield StepRecord(
            uuid="s", pipeline_uuid="p", name="S", position=2, status=Status.FAILED, metadata={"k": [1]},
            output=2**64, attempt=2, error=ErrorInfo(type="E", message="m", traceback="t", hook="on_start"),
            started_at=at, finished_at=None, next_run_at=berlin, rollback=RollbackState.DONE, rollback_attempt=1,
            revision=4, progress={"done": 1}, logs=[{"attempt": 1, "lines": ["a"]}],
        )  # fmt: skip
        yield StepRecord(uuid="s2", pipeline_uuid="p", name="S", status=Status.CREATED, output=7)
        yield MessageRecord(uuid="m", pipeline_uuid="p", name="go", payload=[1, "a"], sent_at=at, consumed_at=at)
        yield MessageRecord(uuid="m2", pipeline_uuid="p", name="go", sent_at=at)
        yield StreamRecord(uuid="p:1", pipeline_uuid="p", seq=1, at=at, value={"v": True})
        yield StreamRecord(uuid="p:2", pipeline_uuid="p", seq=2, at=at, value="text")


def test_rows_made_from_records_are_the_rows_of_their_dicts(tmp_path: Path) -> None:
    backend = SQLBackend(f"sqlite:///{tmp_path / 'rows.db'}")
    for record in _records():
        fast = backend(record.MODEL).fast  # type: ignore[attr-defined]
        assert fast.rows_of([record]) == [fast.row(record.to_dict())], record
    backend.dispose()
