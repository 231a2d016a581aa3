"""Listing pipelines (issue #14): every filter, keyset pages that cover the matches exactly
once, the total, and JSON-typed param filters, the same on the backends with an index
(SQLite, PostgreSQL) and on those listed by the store's fallback (memory, TinyDB, a seed-style
repository); progress reported by hooks is stored with the step (at once, while the hook runs)."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy import event, insert

from prorch import FakeClock, InvalidParamsError, Orchestrator, PipelineNotFoundError, StepUsageError
from prorch.model.registry import Registry
from prorch.storage.store import store_for
from repositories import sql_listing
from repositories.schema import TABLES
from repositories.sql_listing import ended_query
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of

KINDS = ["sqlite", "postgresql", "memory", "tinydb", "seed"]
START = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(params=KINDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    made = make_backend(request.param, tmp_path, request)
    yield made
    if hasattr(made, "dispose"):
        made.dispose()


def stored(backend: Any, registry: Registry) -> tuple[Orchestrator, list[str]]:
    """12 pipelines a minute apart (newest last): two names, two tenants, typed params."""
    work = step_of("Work", lambda self: self.finish({"i": self.params["i"]}))
    fetch = pipeline_of(work, name="Fetch")
    other = pipeline_of(step_of("Other", None, lambda self: None), name="Other")
    clock = FakeClock(START)
    uuids = []
    for i in range(12):
        cls = fetch if i % 3 else other
        params = {"i": i, "s": str(i), "even": i % 2 == 0, "ratio": i / 2}
        created = cls.create(backend, params, tenant="acme" if i < 6 else None, key=f"k{i}", clock=clock)
        uuids.append(created.uuid)
        clock.advance(60)
    return Orchestrator(backend, registry=registry, clock=clock), uuids


def numbers(page: Any) -> list[int]:
    return [p.params["i"] for p in page.pipelines]


def test_filters(backend: Any, registry: Registry) -> None:
    orchestrator, _ = stored(backend, registry)
    assert numbers(orchestrator.query()) == list(range(11, -1, -1))  # newest first
    assert numbers(orchestrator.query(name="Other")) == [9, 6, 3, 0]
    assert numbers(orchestrator.query(tenant="acme", name="Fetch")) == [5, 4, 2, 1]
    assert numbers(orchestrator.query(key="k7")) == [7]
    assert numbers(orchestrator.query(version=2)) == []
    assert numbers(orchestrator.query(since=START + timedelta(minutes=9))) == [11, 10, 9]
    assert numbers(orchestrator.query(until=START + timedelta(minutes=2))) == [1, 0]
    # JSON types: 4 and "4" and true are different values
    assert numbers(orchestrator.query(param=("i", 4))) == [4]
    assert numbers(orchestrator.query(param=("i", "4"))) == []
    assert numbers(orchestrator.query(param=("s", "4"))) == [4]
    assert numbers(orchestrator.query(param=("even", True), name="Other")) == [6, 0]
    assert numbers(orchestrator.query(param=("ratio", 1.5))) == [3]
    assert numbers(orchestrator.query(param=("i", True))) == []
    orchestrator.execute_pipelines()
    finished = orchestrator.query(status="finished", count=True)
    pending = orchestrator.query(status="pending", count=True)
    assert (finished.total, pending.total) == (8, 4)  # Other's hook never finishes
    later = orchestrator.clock.now() - timedelta(seconds=1)
    assert orchestrator.query(updated_since=later, count=True).total == 12
    assert orchestrator.query(updated_until=later, count=True).total == 0


def test_keyset_pages_cover_every_match_once(backend: Any, registry: Registry) -> None:
    orchestrator, uuids = stored(backend, registry)
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = orchestrator.query(limit=5, after=after, count=True)
        assert page.total == 12
        seen += [p.uuid for p in page.pipelines]
        pages += 1
        after = page.next_after
        if after is None:
            break
    assert seen == list(reversed(uuids)) and pages == 3
    filtered = orchestrator.query(name="Fetch", limit=3)
    rest = orchestrator.query(name="Fetch", limit=10, after=filtered.next_after)
    assert numbers(filtered) + numbers(rest) == [11, 10, 8, 7, 5, 4, 2, 1]
    assert rest.next_after is None


def test_bad_queries_get_one_clear_error(backend: Any, registry: Registry) -> None:
    orchestrator, _ = stored(backend, registry)
    with pytest.raises(InvalidParamsError, match="limit must be a whole number from 1 to 1000"):
        orchestrator.query(limit=0)
    with pytest.raises(InvalidParamsError, match="timezone-aware"):
        orchestrator.query(since=datetime(2026, 1, 1))
    with pytest.raises(InvalidParamsError, match="top-level params field name"):
        orchestrator.query(param=("a.b", 1))
    with pytest.raises(InvalidParamsError, match="string, number or boolean"):
        orchestrator.query(param=("i", [1]))  # type: ignore[arg-type]
    with pytest.raises(PipelineNotFoundError, match="no pipeline with that uuid"):
        orchestrator.query(after="00000000-0000-0000-0000-000000000000")


def test_progress_is_stored_with_the_step(backend: Any, registry: Registry) -> None:
    def report(step: Any) -> None:
        step.progress(3, 10, note="pages")
        if step.attempt == 1 and "bad" in step.params:
            step.progress(-1)

    pipeline = pipeline_of(step_of("Report", lambda self: None, report, max_attempts=2), name="Reporting")
    orchestrator = Orchestrator(backend, registry=registry)
    good = pipeline.create(backend, {}).uuid
    bad = pipeline.create(backend, {"bad": True}).uuid
    orchestrator.execute_pipelines()
    progress = orchestrator.get(good).steps[0].progress
    assert progress is not None and (progress["done"], progress["total"], progress["note"]) == (3, 10, "pages")
    assert datetime.fromisoformat(progress["at"]).tzinfo is not None
    step = orchestrator.get(bad).steps[0]
    assert step.error is not None and step.error.type == StepUsageError.__name__
    assert "progress(done=...) needs a number >= 0, got -1" in step.error.message
    if getattr(store_for(backend).engine, "live_progress", False):  # stored at once, while the failed hook ran: kept
        assert step.progress is not None and step.progress["done"] == 3
    else:  # a four-method repository: with the transition only, which a failed hook's reports miss
        assert step.progress is None


def test_sqlite_pages_come_from_the_listing_indexes(tmp_path: Path, registry: Registry) -> None:
    backend = make_backend("sqlite", tmp_path, None)  # type: ignore[arg-type]
    stored(backend, registry)
    connection = sqlite3.connect(tmp_path / "prorch.db")
    plans = {
        "all": "SELECT uuid FROM pipelines ORDER BY created_at DESC, uuid DESC LIMIT 50",
        "status": "SELECT uuid FROM pipelines WHERE status = 'pending' ORDER BY created_at DESC, uuid DESC LIMIT 50",
        "name": "SELECT uuid FROM pipelines WHERE name = 'Fetch' ORDER BY created_at DESC, uuid DESC LIMIT 50",
    }
    used = {k: " ".join(row[3] for row in connection.execute("EXPLAIN QUERY PLAN " + q)) for k, q in plans.items()}
    assert "ix_pipelines_created" in used["all"] and "TEMP B-TREE" not in used["all"]
    assert "ix_pipelines_status_created" in used["status"] and "TEMP B-TREE" not in used["status"]
    assert "ix_pipelines_name_created" in used["name"] and "TEMP B-TREE" not in used["name"]
    backend.dispose()


def test_overview_counts(backend: Any, registry: Registry) -> None:
    orchestrator, _ = stored(backend, registry)
    now = orchestrator.clock.now()
    before = orchestrator.store.pipeline_stats(now, now - timedelta(hours=1))
    assert sorted(before.counts) == [("pending", "Fetch", 1, 8), ("pending", "Other", 1, 4)]
    assert (before.due, before.running, before.quarantined, before.ended) == (12, 0, 0, [])
    assert before.oldest_due == START
    orchestrator.execute_pipelines()
    after = orchestrator.store.pipeline_stats(now, now - timedelta(hours=1))
    assert sorted(after.counts) == [("finished", "Fetch", 1, 8), ("pending", "Other", 1, 4)]
    assert after.due == 4 and [status for status, _ in after.ended] == ["finished"] * 8


def test_the_oldest_due_leaves_out_pipelines_a_worker_holds(backend: Any, registry: Registry) -> None:
    """Regression (#25): ``prorch_oldest_due_age_seconds`` counted a running (leased) pipeline,
    so the documented alert fired on any long hook; it is the age of the oldest one waiting."""
    orchestrator, uuids = stored(backend, registry)
    store = orchestrator.store
    if not store.can_claim:
        pytest.skip("no leases on a repository without claims")
    now = orchestrator.clock.now()
    assert store.claim_one(uuids[0], now, "worker", now + timedelta(minutes=5)) is not None  # the oldest runs
    stats = store.pipeline_stats(now, now - timedelta(hours=1))
    assert (stats.running, stats.due) == (1, 11)
    assert stats.oldest_due == START + timedelta(minutes=1)


def test_sqlite_overview_counts_read_indexes_only(tmp_path: Path, registry: Registry) -> None:
    backend = make_backend("sqlite", tmp_path, None)  # type: ignore[arg-type]
    stored(backend, registry)
    connection = sqlite3.connect(tmp_path / "prorch.db")
    plans = {
        "ix_pipelines_status_name": "SELECT status, name, version, count(*) FROM pipelines "
        "GROUP BY status, name, version",
        "ix_pipelines_due": "SELECT count(*) FROM pipelines WHERE status = 'pending' AND next_run_at <= '2030-01-01'",
        "ix_pipelines_ended": str(ended_query(TABLES["PIPELINE"], "sqlite")).replace(":since", "'2026-01-01'"),
    }
    for index, query in plans.items():
        plan = " ".join(row[3] for row in connection.execute("EXPLAIN QUERY PLAN " + query))
        assert index in plan and "SCAN pipelines\\b" not in plan, (index, plan)
    backend.dispose()


GROUPS = {  # (status, name, version): pipelines; the largest has groups on each side in every column
    ("cancelled", "M", 2): 3,
    ("failed", "M", 2): 1,
    ("finished", "A", 1): 2,
    ("finished", "M", 1): 4,
    ("finished", "M", 2): 200,
    ("finished", "M", 3): 5,
    ("finished", "Z", 1): 6,
    ("pending", "M", 2): 7,
}


def grouped(backend: Any) -> None:
    """GROUPS as pipeline rows, written straight to the table (only the counted columns matter)."""
    rows = [
        {"uuid": str(uuid4()), "status": s, "name": n, "version": v, "params": {}, "context": {}, "metadata": {}}
        for (s, n, v), count in GROUPS.items()
        for _ in range(count)
    ]
    with backend.engine.begin() as connection:
        connection.execute(insert(TABLES["PIPELINE"]), rows)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_overview_group_counts_around_the_largest(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The overview's counts by (status, name, version) on SQL stores: the largest group, which
    SQLite derives from the table's total instead of walking it, and every other group, counted
    in the ranges around it, whichever group is taken as the largest (even one not stored)."""
    backend = make_backend(kind, tmp_path, request)
    grouped(backend)
    expected = sorted((*group, count) for group, count in GROUPS.items())
    stats = backend.pipeline_stats(START, START - timedelta(hours=1))
    assert stats.counts == expected
    table = TABLES["PIPELINE"]
    with backend.engine.connect() as connection:
        assert sql_listing.largest_group(table, connection) == ("finished", "M", 2)  # 200 of 228: 88% of a sample
        for guess in [*GROUPS, ("finished", "N", 1), ("aborted", "A", 1), ("waiting", "Z", 9)]:
            assert sql_listing.counts_around(table, connection, guess) == expected, guess
    backend.dispose()


def test_overview_group_counts_without_a_large_group(tmp_path: Path) -> None:
    """When no group holds a quarter of the sample (50 groups of 2 here), SQLite counts with one
    GROUP BY (leaving out a small group would not pay for the total's count); the same counts."""
    backend = make_backend("sqlite", tmp_path, None)  # type: ignore[arg-type]
    rows = [
        {"uuid": str(uuid4()), "status": "pending", "name": f"N{i % 50:02}", "version": 1, "params": {}, "context": {},
         "metadata": {}}
        for i in range(100)
    ]  # fmt: skip
    with backend.engine.begin() as connection:
        connection.execute(insert(TABLES["PIPELINE"]), rows)
    with backend.engine.connect() as connection:
        assert sql_listing.largest_group(TABLES["PIPELINE"], connection) is None
    stats = backend.pipeline_stats(START, START - timedelta(hours=1))
    assert stats.counts == [("pending", f"N{i:02}", 1, 2) for i in range(50)]
    backend.dispose()


def test_sqlite_overview_group_counts_plans(tmp_path: Path) -> None:
    """The statements the overview's group counts run on SQLite, as they run: the sample seeks
    the primary key; the groups around the largest are ranges of the covering (status, name,
    version) index; the total is SQLite's count of a whole table (the ``Count`` opcode, which adds
    up the cells of an index's pages instead of stepping through its entries)."""
    backend = make_backend("sqlite", tmp_path, None)  # type: ignore[arg-type]
    grouped(backend)
    statements: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        statements.append((statement, parameters))

    event.listen(backend.engine, "before_cursor_execute", record)
    backend.pipeline_stats(START, START - timedelta(hours=1))
    event.remove(backend.engine, "before_cursor_execute", record)
    sample, around = statements[0], statements[1]
    connection = sqlite3.connect(tmp_path / "prorch.db")
    plan = [row[3] for row in connection.execute("EXPLAIN QUERY PLAN " + sample[0], sample[1])]
    searches = [step for step in plan if step.startswith(("SEARCH", "SCAN pipelines"))]
    assert len(searches) == sql_listing.SAMPLES and all("(uuid>?)" in step for step in searches), plan
    plan = [row[3] for row in connection.execute("EXPLAIN QUERY PLAN " + around[0], around[1])]
    ranges = [step for step in plan if step.startswith("SEARCH")]
    assert len(ranges) == 6 and all("COVERING INDEX ix_pipelines_status_name" in step for step in ranges), plan
    scans = [step for step in plan if step.startswith("SCAN pipelines")]
    assert len(scans) == 1 and "COVERING INDEX" in scans[0], plan  # the total's
    opcodes = [row[1] for row in connection.execute("EXPLAIN " + around[0], around[1])]
    assert opcodes.count("Count") == 1 and opcodes.count("AggStep") >= 6, opcodes
    backend.dispose()
