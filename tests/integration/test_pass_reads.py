"""What a pass reads and writes in bulk (issue #13): the steps of every claimed pipeline in one
query, with a bad step kept on its own pipeline; create_many's rows a chunk at a time."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from prorch import Orchestrator, Status
from prorch.model.clock import FakeClock
from prorch.storage.store import SAVE_CHUNK, Store
from repositories.sql import SQLRepository
from repositories.sqlite import SQLiteRepository
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of


def counting(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[Any]:
    calls: list[Any] = []
    original = getattr(owner, name)

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "model", None) == "STEP":
            calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_pass_reads_the_steps_of_its_pipelines_in_one_query(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend(kind, tmp_path, request)
    pipeline = pipeline_of(*(step_of(name, lambda self: None) for name in "AB"), name="Two")
    pipeline.create_many(backend, [{}] * 30)
    owner = SQLiteRepository if kind == "sqlite" else SQLRepository
    one_each = counting(monkeypatch, owner, "search")
    at_once = counting(monkeypatch, owner, "search_many")
    summary = Orchestrator(backend, concurrency=1).execute_pipelines()
    assert summary.finished == 30
    assert len(at_once) == 1 and not one_each


def test_a_bad_step_read_with_the_others_is_reported_on_its_own_pipeline(tmp_path: Path) -> None:
    backend = make_backend("sqlite", tmp_path, None)  # type: ignore[arg-type]
    pipeline = pipeline_of(step_of("A", lambda self: None), name="One")
    uuids = [record.uuid for record in pipeline.create_many(backend, [{}] * 3)]
    with sqlite3.connect(tmp_path / "prorch.db") as connection:
        connection.execute("UPDATE pipeline_steps SET status = 'exploded' WHERE pipeline_uuid = ?", (uuids[1],))
    summary = Orchestrator(backend, concurrency=1).execute_pipelines()
    assert summary.finished == 2
    assert list(summary.errors) == [uuids[1]] and "CorruptRecordError" in summary.errors[uuids[1]]
    store = Store(backend)
    assert [store.get_pipeline(uuid).status for uuid in uuids] == [  # type: ignore[union-attr]
        Status.FINISHED,
        Status.PENDING,
        Status.FINISHED,
    ]


def test_create_many_stores_its_rows_a_chunk_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = make_backend("sqlite", tmp_path, None)  # type: ignore[arg-type]
    pipeline = pipeline_of(*(step_of(name, lambda self: None) for name in "ABC"), name="Three")
    batches = counting(monkeypatch, SQLiteRepository, "save_records")  # rows from records (pipelines: save_many)
    count = 2 * SAVE_CHUNK + 7
    pipeline.create_many(backend, [{}] * count)
    sizes = [len(rows) for (rows,) in batches]
    assert max(sizes) <= SAVE_CHUNK and sum(sizes) == 3 * count  # every step row, never all at once
    assert len(Store(backend).pipelines_with_status(Status.PENDING)) == count


def test_a_pass_with_nothing_due_commits_nothing_to_sqlite(tmp_path: Path) -> None:
    """Guard (#28, W2): a pass over waiting pipelines only writes nothing, so at the durable
    default (``synchronous=FULL``) it waits for no fsync: the store's ``PRAGMA data_version``,
    read from another connection, and its WAL stay as they were. Checked when W2 (1,000,000
    waiting) missed its 50 ms: an idle pass already made no commit; a pass with due pipelines
    commits its claim and its rounds."""
    path = tmp_path / "prorch.db"
    pipeline = pipeline_of(step_of("A", lambda self: None), name="Later")
    worker = Orchestrator(f"sqlite:///{path}", concurrency=1)
    tomorrow = FakeClock(worker.clock.now() + timedelta(days=1))  # created due tomorrow: waiting
    pipeline.create_many(worker.store.backend, [{}] * 50, clock=tomorrow)
    watcher = sqlite3.connect(path)
    try:
        before = watcher.execute("PRAGMA data_version").fetchone(), (tmp_path / "prorch.db-wal").stat().st_size
        assert worker.execute_pipelines().claimed == 0
        after = watcher.execute("PRAGMA data_version").fetchone(), (tmp_path / "prorch.db-wal").stat().st_size
        assert after == before
        pipeline.create(worker.store.backend)  # one due: the next pass commits, and the watcher sees it
        assert worker.execute_pipelines().finished == 1
        assert watcher.execute("PRAGMA data_version").fetchone() != before[0]
    finally:
        watcher.close()
