"""Group commit on real stores: several pipelines' transitions in one transaction, each
all-or-nothing on its own; a transition acknowledged (the next hook, visible records) only once
committed; one commit (one TinyDB file write) per round; crash marks of a round shared, and the
pipelines found with a mark run alone."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.engine import Engine

from prorch import ConcurrentUpdateError, FakeClock, Orchestrator, Status, Step
from prorch.model.records import EventRecord, PipelineRecord, new_uuid
from prorch.model.registry import Registry
from prorch.model.status import EventType
from prorch.storage.store import Store, Write
from repositories.postgresql import PostgreSQLBackend
from repositories.postgresql_transitions import TransitionStatements
from repositories.sql import SQLRepository
from repositories.sqlite import SQLiteBackend
from repositories.tinydb import AtomicJSONStorage
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of

GROUP_BACKENDS = ["memory", "sqlite", "postgresql", "tinydb"]


def event_for(record: PipelineRecord) -> EventRecord:
    return EventRecord(
        uuid=new_uuid(), pipeline_uuid=record.uuid, type=EventType.PIPELINE_STARTED, at=record.created_at, data={}
    )


@pytest.mark.parametrize("kind", GROUP_BACKENDS)
def test_a_refused_write_in_a_group_undoes_that_write_only(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    pipeline = pipeline_of(step_of("A", lambda self: None))
    uuids = [pipeline.create(backend, registry=registry).uuid for _ in range(3)]
    store = Store(backend)
    records = [store.get_pipeline(uuid) for uuid in uuids]
    assert all(records)
    first, stale, third = (r for r in records if r is not None)
    stored = store.tracking([first, stale, third])  # writes send only what changed
    stale.revision -= 1  # read before someone else's write: its compare-and-set must be refused
    for record in (first, stale, third):
        record.priority = 7
    events = [event_for(record) for record in (first, stale, third)]
    pairs = zip((first, stale, third), events, strict=True)
    writes = [Write.of([record], [event], snapshots=stored) for record, event in pairs]

    outcomes = store.commit_many(writes)

    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], ConcurrentUpdateError)
    assert stale.revision == first.revision - 2  # the refused write keeps the revision it was read with
    fresh = Store(make_backend(kind, tmp_path, request) if kind != "memory" else backend)
    for record, event, written in zip((first, stale, third), events, (True, False, True), strict=True):
        stored = fresh.get_pipeline(record.uuid)
        assert stored is not None and (stored.priority == 7) is written
        assert any(e.uuid == event.uuid for e in fresh.events_of(record.uuid)) is written


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_store_error_in_one_write_of_a_group_undoes_that_write_only(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    pipeline = pipeline_of(step_of("A", lambda self: None))
    uuids = [pipeline.create(backend, registry=registry).uuid for _ in range(2)]
    store = Store(backend)
    records = [r for r in (store.get_pipeline(uuid) for uuid in uuids) if r is not None]
    before = [r.revision for r in records]
    for record in records:
        record.priority = 9
    duplicate = event_for(records[0])
    # the same event in two writes of one group: the second insert fails half-way through its
    # write (its pipeline already written), so the group is stored one write at a time instead
    outcomes = store.commit_many([Write.of([records[0]], [duplicate]), Write.of([records[1]], [duplicate])])
    assert outcomes[0] is None and outcomes[1] is not None
    assert records[1].revision == before[1]
    stored = Store(make_backend(kind, tmp_path, request)).get_pipeline(uuids[1])
    assert stored is not None and stored.priority == 0


@pytest.mark.parametrize("kind", GROUP_BACKENDS)
def test_a_refused_step_in_a_group_undoes_that_write_only(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    """The pipeline's compare-and-set passes but one of its steps' is refused: nothing of that
    transition is stored (on PostgreSQL its one statement is rolled back with the round, and
    the others are stored again one by one)."""
    backend = make_backend(kind, tmp_path, request)
    pipeline = pipeline_of(step_of("A", lambda self: None))
    uuids = [pipeline.create(backend, registry=registry).uuid for _ in range(3)]
    store = Store(backend)
    pipelines = [r for r in (store.get_pipeline(uuid) for uuid in uuids) if r is not None]
    steps = [store.steps_of(uuid)[0] for uuid in uuids]
    stored = store.tracking([*pipelines, *steps])
    steps[1].revision += 5  # as if read before writes that never happened: refused
    events = [event_for(record) for record in pipelines]
    for record, step in zip(pipelines, steps, strict=True):
        record.priority = 3
        step.metadata["seen"] = True
    triples = zip(steps, pipelines, events, strict=True)
    writes = [Write.of([step, record], [event], snapshots=stored) for step, record, event in triples]

    outcomes = store.commit_many(writes)

    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], ConcurrentUpdateError)
    fresh = Store(make_backend(kind, tmp_path, request) if kind != "memory" else backend)
    for record, event, written in zip(pipelines, events, (True, False, True), strict=True):
        stored = fresh.get_pipeline(record.uuid)
        assert stored is not None and (stored.priority == 3) is written
        assert (fresh.steps_of(record.uuid)[0].metadata.get("seen") is True) is written
        assert any(e.uuid == event.uuid for e in fresh.events_of(record.uuid)) is written


def two_step_pipeline(seen: list[tuple[str, bool]], reader: Store) -> type[Any]:
    """Step B's hook looks, through another connection, at what the store holds of step A."""

    def check(self: Step) -> None:
        stored = {s.name: s.status for s in reader.steps_of(self.pipeline_uuid)}
        seen.append((self.pipeline_uuid, stored["A"] == Status.FINISHED))

    return pipeline_of(step_of("A", lambda self: None), step_of("B", check))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "tinydb"])
@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_hook_starts_only_after_the_transition_before_it_is_committed(
    kind: str, concurrency: int, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    seen: list[tuple[str, bool]] = []
    pipeline = two_step_pipeline(seen, Store(make_backend(kind, tmp_path, request)))
    uuids = {pipeline.create(backend, registry=registry).uuid for _ in range(12)}
    orchestrator = Orchestrator(backend, registry=registry, concurrency=concurrency, group_commit=8)
    summary = orchestrator.execute_pipelines()
    assert summary.finished == 12 and not summary.errors
    assert {uuid for uuid, _ in seen} == uuids
    assert all(committed for _, committed in seen), seen


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: type, name: str, wanted: Any = None) -> list[int]:
    """Count calls of a real method (it still runs)."""
    calls: list[int] = []
    original = getattr(owner, name)

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        if wanted is None or wanted(*args, **kwargs):
            calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("group_commit", [1, 32])
def test_tinydb_writes_its_file_once_per_round(
    group_commit: int, tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend("tinydb", tmp_path, None)  # type: ignore[arg-type]
    pipeline = pipeline_of(*(step_of(name, lambda self: None) for name in "ABC"))
    for _ in range(10):
        pipeline.create(backend, registry=registry)
    replaced = count_calls(monkeypatch, AtomicJSONStorage, "_replace")
    summary = Orchestrator(backend, registry=registry, concurrency=1, group_commit=group_commit).execute_pipelines()
    assert summary.finished == 10 and summary.transitions == 30
    # 10 pipelines x (a hook mark + 3 transitions) = 40 writes, plus the claim
    if group_commit == 1:
        assert len(replaced) >= 40
    else:
        assert len(replaced) <= 6, len(replaced)


@pytest.mark.parametrize("group_commit", [1, 32])
def test_sqlite_commits_once_per_round(
    group_commit: int, tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = SQLiteBackend(f"sqlite:///{tmp_path / 'p.db'}")
    pipeline = pipeline_of(*(step_of(name, lambda self: None) for name in "ABC"))
    pipeline.create_many(backend, [{}] * 20, registry=registry)
    commits = count_calls(monkeypatch, SQLiteBackend, "_end", lambda connection, handle, *, commit: commit)
    summary = Orchestrator(backend, registry=registry, concurrency=1, group_commit=group_commit).execute_pipelines()
    assert summary.finished == 20
    if group_commit == 1:
        assert len(commits) >= 80  # a hook mark and 3 transitions each
    else:
        assert len(commits) <= 5, len(commits)  # 60 writes (the claim stores the marks) in rounds of up to 32


@pytest.mark.parametrize("group_commit", [1, 32])
def test_postgresql_writes_a_transition_in_one_statement_and_a_round_in_one_call(
    group_commit: int, postgres_url: str, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = PostgreSQLBackend(postgres_url)
    pipeline = pipeline_of(*(step_of(name, lambda self: None) for name in "ABC"))
    pipeline.create_many(backend, [{}] * 20, registry=registry)
    calls = count_calls(monkeypatch, PostgreSQLBackend, "write_transitions")
    statements = count_calls(monkeypatch, TransitionStatements, "statement")
    separate = count_calls(monkeypatch, SQLRepository, "compare_and_set")
    summary = Orchestrator(backend, registry=registry, concurrency=1, group_commit=group_commit).execute_pipelines()
    assert summary.finished == 20
    # 3 transitions each, one statement each, and with group_commit 1 a hook mark each (grouped,
    # the claim stores the marks)
    assert len(statements) == (80 if group_commit == 1 else 60) and not separate
    if group_commit == 1:
        assert len(calls) == 80
    else:
        assert len(calls) <= 5, len(calls)  # one round trip per round of up to 32


def test_a_lease_lost_in_a_round_costs_only_that_pipeline(tmp_path: Path, registry: Registry) -> None:
    """Another worker takes one pipeline over while its hook runs (its lease had run out): that
    pipeline's write is refused; the others of the round are stored."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    clock = FakeClock()
    other_store = Store(SQLiteBackend(url))

    def take_over(self: Step) -> None:
        later = clock.now() + timedelta(seconds=120)
        assert other_store.claim_one(self.pipeline_uuid, later, "other-worker", later + timedelta(seconds=60))

    victim_pipeline = pipeline_of(step_of("Hijacked", take_over), name="Victim")
    plain = pipeline_of(step_of("Plain", lambda self: None), name="Plain")
    backend = SQLiteBackend(url)
    victim = victim_pipeline.create(backend, registry=registry, clock=clock).uuid
    others = [plain.create(backend, registry=registry, clock=clock).uuid for _ in range(4)]
    orchestrator = Orchestrator(backend, registry=registry, clock=clock, concurrency=1, group_commit=32)
    summary = orchestrator.execute_pipelines()
    assert list(summary.errors) == [victim] and "ConcurrentUpdateError" in summary.errors[victim]
    for uuid in others:
        assert orchestrator.get(uuid).pipeline.status == Status.FINISHED
    state = orchestrator.get(victim)
    assert state.pipeline.lease_owner == "other-worker" and state.steps[0].status != Status.FINISHED


def left_marked_by_a_dead_worker(
    backend: SQLiteBackend, pipeline: type[Any], count: int, clock: FakeClock, registry: Registry, *, shared: bool
) -> list[str]:
    """``count`` pipelines that a worker claimed, marked as running a hook, and died with; the
    clock is then past its lease. Returns their uuids."""
    uuids = [pipeline.create(backend, registry=registry, clock=clock).uuid for _ in range(count)]
    store = Store(backend)
    start = clock.now()
    for record in store.claim_due(start, "dead-worker#1", start + timedelta(seconds=60), 10):
        record.hook_started_at, record.hook_shared = start, shared
        store.commit([record])
    clock.advance(61)
    return uuids


def test_marks_of_a_round_are_shared_and_a_marked_pipeline_runs_alone(tmp_path: Path, registry: Registry) -> None:
    """After a worker died in a round, the pipelines it had marked run alone: while one of
    their hooks runs, it carries its own exact mark and no other pipeline carries one (stale
    shared marks charge nobody), so a death then is pinned on it alone."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    clock = FakeClock()
    reader = Store(SQLiteBackend(url))
    marked_elsewhere: list[list[str]] = []
    own: list[bool] = []

    def look(self: Step) -> None:
        exact = [p.uuid for p in reader.all_pipelines() if p.hook_started_at is not None and not p.hook_shared]
        own.append(self.pipeline_uuid in exact)
        marked_elsewhere.append([uuid for uuid in exact if uuid != self.pipeline_uuid])

    backend = SQLiteBackend(url)
    uuids = left_marked_by_a_dead_worker(backend, pipeline_of(step_of("Look", look)), 3, clock, registry, shared=True)
    orchestrator = Orchestrator(backend, registry=registry, clock=clock, concurrency=1, group_commit=32)
    summary = orchestrator.execute_pipelines()
    assert summary.finished == 3
    assert own == [True, True, True] and marked_elsewhere == [[], [], []]  # each ran alone
    for uuid in uuids:
        assert orchestrator.get(uuid).pipeline.crashes == 0  # a shared mark charges nobody


def test_an_exact_mark_is_charged_and_the_charge_stored_before_any_hook(tmp_path: Path, registry: Registry) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    clock = FakeClock()
    reader = Store(SQLiteBackend(url))
    crashes_seen: dict[str, int] = {}

    def look(self: Step) -> None:
        for record in reader.all_pipelines():
            crashes_seen.setdefault(record.uuid, record.crashes)

    backend = SQLiteBackend(url)
    # exact marks (group_commit = 1, or alone): both hooks were running
    uuids = left_marked_by_a_dead_worker(backend, pipeline_of(step_of("Look", look)), 2, clock, registry, shared=False)
    orchestrator = Orchestrator(backend, registry=registry, clock=clock, concurrency=1, group_commit=32)
    assert orchestrator.execute_pipelines().finished == 2
    # when the first hook ran, both charges were stored already
    assert crashes_seen == {uuid: 1 for uuid in uuids}


def run_worker_until_finished(orchestrator: Orchestrator, count: int, seconds: float = 60) -> None:
    """``run_forever`` in a thread until ``count`` pipelines finished, then stop it."""
    thread = threading.Thread(target=orchestrator.run_forever, kwargs={"interval": 0.05})
    thread.start()
    try:
        deadline = time.monotonic() + seconds
        while len(orchestrator.list_pipelines(status="finished")) < count:
            assert time.monotonic() < deadline, "the worker did not finish the pipelines in time"
            time.sleep(0.02)
    finally:
        orchestrator.stop()
        thread.join()


def test_a_worker_stores_quick_hooks_transitions_in_groups_as_a_pass_does(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (#27's W1 through the worker, 3x slower than a pass): a slot held a pipeline
    through its commits, so a commit held at most one transition per slot (about 4 per commit
    at concurrency 4). Quick hooks' transitions now fill a group, as in a pass's rounds."""
    backend = SQLiteBackend(f"sqlite:///{tmp_path / 'p.db'}")
    pipeline = pipeline_of(*(step_of(name, lambda self: None) for name in "ABC"))
    pipeline.create_many(backend, [{}] * 60, registry=registry)
    groups: list[int] = []
    original = Store.commit_many

    def counted(self: Store, writes: Any) -> Any:
        groups.append(len(writes))
        return original(self, writes)

    monkeypatch.setattr(Store, "commit_many", counted)
    orchestrator = Orchestrator(backend, registry=registry, concurrency=4, group_commit=32)
    run_worker_until_finished(orchestrator, 60)
    assert sum(groups) >= 180  # 3 transitions each (and a hook mark each, where the claim does not store it)
    assert len(groups) <= 20, f"{len(groups)} commits of {groups}"


@pytest.mark.parametrize("runner", ["worker", "pass"])
@pytest.mark.parametrize("kind", [*GROUP_BACKENDS, "docs-example"])
def test_a_claimed_pipelines_first_hook_starts_after_one_commit(
    kind: str,
    runner: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """#28 item 5 and #27: the worker's claim and a pass's claim store the hook marks
    (``ClaimRequest.mark``), so no second commit (the mark) comes before the first hook: one
    write per pipeline here, its transition. Each hook sees its mark stored (shared, as a
    round's), so a worker dying in it leaves a crash suspect, as the mark's own commit did. A
    user's repository (docs/repositories.md's) claims without marks: the engine marks, in a
    write of its own, as before."""
    backend = make_backend(kind, tmp_path, request)
    reader = Store(backend)
    marked_when_run: list[bool] = []

    def look(self: Step) -> None:
        record = reader.get_pipeline(self.pipeline_uuid)
        marked_when_run.append(record is not None and record.hook_started_at is not None and record.hook_shared)

    pipeline = pipeline_of(step_of("Look", look))
    for _ in range(8):
        pipeline.create(backend, registry=registry)
    writes = count_calls(monkeypatch, Store, "commit_write")
    groups: list[int] = []
    original = Store.commit_many

    def counted(self: Store, many: Any) -> Any:
        groups.append(len(many))
        return original(self, many)

    monkeypatch.setattr(Store, "commit_many", counted)
    orchestrator = Orchestrator(backend, registry=registry, concurrency=4, group_commit=32)
    if runner == "worker":
        run_worker_until_finished(orchestrator, 8)
    else:
        summary = orchestrator.execute_pipelines()
        assert summary.finished == 8 and not summary.errors
    assert marked_when_run == [True] * 8
    assert sum(groups) + len(writes) == (8 if kind in GROUP_BACKENDS else 16), (groups, len(writes))


def test_a_pass_on_sqlite_commits_once_before_its_first_hook(tmp_path: Path, registry: Registry) -> None:
    """#27: the COMMITs the SQLite file sees (every statement traced on each driver connection)
    from the start of a pass to its first hook: the claim's only, its hook marks in it."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    statements: list[str] = []
    commits_at_hooks: list[int] = []

    def look(self: Step) -> None:
        commits_at_hooks.append(sum(1 for sql in list(statements) if sql.strip().upper().startswith("COMMIT")))

    pipeline = pipeline_of(step_of("Look", look))
    pipeline.create_many(SQLiteBackend(url), [{}] * 6, registry=registry)

    def trace(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.set_trace_callback(statements.append)

    sqlalchemy_event.listen(Engine, "connect", trace)  # every connection the pass's backend opens
    try:
        backend = SQLiteBackend(url)
        orchestrator = Orchestrator(backend, registry=registry, concurrency=2, group_commit=32)
        statements.clear()
        summary = orchestrator.execute_pipelines()
    finally:
        sqlalchemy_event.remove(Engine, "connect", trace)
    assert summary.finished == 6
    assert commits_at_hooks[0] == 1, statements


def test_a_worker_stores_and_starts_slow_hooks_while_its_claim_commits(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#27 W4: with slow hooks running, a claim (a commit, an fsync) ran in the worker's loop,
    and the hooks that returned meanwhile waited for it before their transitions were stored and
    their next hooks started. The claim now runs in a thread of its own: here a claim held until
    a running pipeline's second hook starts is released by that start, not by its timeout."""
    backend = SQLiteBackend(f"sqlite:///{tmp_path / 'p.db'}")
    second_started = threading.Event()
    pipeline = pipeline_of(
        step_of("First", lambda self: time.sleep(0.2)), step_of("Second", lambda self: second_started.set())
    )
    uuid = pipeline.create(backend, registry=registry).uuid
    original = Store.claim
    calls: list[int] = []
    held_until_started: list[bool] = []

    def claim(self: Store, request: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the first claim after the pipeline's first hook started
            held_until_started.append(second_started.wait(3))
        return original(self, request)

    monkeypatch.setattr(Store, "claim", claim)
    orchestrator = Orchestrator(backend, registry=registry, concurrency=4, group_commit=32)
    run_worker_until_finished(orchestrator, 1, seconds=30)
    assert orchestrator.get(uuid).pipeline.status == Status.FINISHED
    assert held_until_started == [True]
