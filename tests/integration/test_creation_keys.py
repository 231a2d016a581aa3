"""Creation keys on every backend, and exactly once under concurrency: 4 processes creating the
same keys at the same moment, on SQLite and PostgreSQL (and TinyDB), store one pipeline per key."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text

from prorch import KeyConflictError, Orchestrator
from prorch.model.keys import uuid_for_key
from prorch.model.status import Status
from prorch.storage.store import Store
from repositories import from_url
from repositories.postgresql import KEY_LOCK_BUCKETS
from tests.integration.key_race import KeyRacePipeline, create_in_lockstep
from tests.support.purging import purging_orchestrator

PRORCH = str(Path(sys.executable).parent / "prorch")
PROCESSES = 4
ROUNDS = 25


def test_keys_on_every_backend(backend: Any) -> None:
    long_key = "k" * 200  # regression: a 40-character uuid= failed on PostgreSQL's uuid column
    first = KeyRacePipeline.create(backend, {"order": 1}, key=long_key)
    again = KeyRacePipeline.create(backend, {"order": 1}, key=long_key)
    assert (first.created, again.created) == (True, False)
    assert again.uuid == first.uuid == uuid_for_key(long_key)
    with pytest.raises(KeyConflictError, match=f"key '{long_key}' already names pipeline KeyRacePipeline"):
        KeyRacePipeline.create(backend, {"order": 2}, key=long_key)
    made = KeyRacePipeline.create_many(backend, [{"order": 1}, {"order": 3}], keys=[long_key, "other"])
    assert [p.created for p in made] == [False, True]
    orchestrator = Orchestrator(backend)
    assert len(orchestrator.list_pipelines()) == 2
    state = orchestrator.get_by_key(long_key)
    assert state.pipeline.key == long_key and state.pipeline.params == {"order": 1}


@pytest.mark.parametrize(
    ("kind", "by"),
    [("sqlite", "key"), ("postgresql", "key"), ("tinydb", "key"), ("sqlite", "uuid"), ("postgresql", "uuid")],
)
def test_four_processes_creating_one_key_at_once_store_one_pipeline(
    kind: str, by: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Regression: with create(uuid=...), about 1 round in 10 raised IntegrityError on SQLite."""
    url = {
        "sqlite": f"sqlite:///{tmp_path / 'keys.db'}",
        "tinydb": f"tinydb:///{tmp_path / 'keys.json'}",
    }.get(kind) or request.getfixturevalue("postgres_url")
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(PROCESSES), context.Queue()
    keys = [f"order-{n}" for n in range(ROUNDS)]
    processes = [
        context.Process(target=create_in_lockstep, args=(url, keys, barrier, results, by)) for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    reports = [results.get(timeout=120) for _ in range(PROCESSES * ROUNDS)]
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    errors = [error for _, _, _, error in reports if error]
    assert errors == []
    for key in keys:
        mine = [(uuid, created) for k, uuid, created, _ in reports if k == key]
        assert len(mine) == PROCESSES
        assert sum(created for _, created in mine) == 1, (key, mine)  # exactly one process created it
        assert len({uuid for uuid, _ in mine}) == 1
        if by == "key":
            assert {uuid for uuid, _ in mine} == {uuid_for_key(key)}
    stored = Orchestrator(url).list_pipelines()
    assert sorted(p.params["order"] for p in stored) == sorted(keys)


def test_prorch_start_with_a_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])

    def prorch(*args: str) -> subprocess.CompletedProcess[str]:
        command = [PRORCH, "-r", url, "--app", "tests.integration.key_race", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)

    first = prorch("start", "KeyRacePipeline", "-p", "order=7", "--key", "order-7")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == uuid_for_key("order-7")
    again = prorch("start", "KeyRacePipeline", "-p", "order=7", "--key", "order-7")
    assert again.returncode == 0 and again.stdout.strip() == f"{uuid_for_key('order-7')} exists"
    as_json = prorch("start", "KeyRacePipeline", "-p", "order=7", "--key", "order-7", "--json")
    assert '"created": false' in as_json.stdout and '"key": "order-7"' in as_json.stdout
    conflict = prorch("start", "KeyRacePipeline", "-p", "order=8", "--key", "order-7")
    assert conflict.returncode == 2
    assert conflict.stderr.startswith("error: key 'order-7' already names pipeline KeyRacePipeline")
    assert 'this create asked for KeyRacePipeline with params {"order": 8}' in conflict.stderr
    shown = prorch("show", "--key", "order-7")
    assert shown.returncode == 0 and "  key: order-7" in shown.stdout
    too_long = prorch("start", "KeyRacePipeline", "-p", "order=1", "--key", "x" * 201)
    assert too_long.returncode == 2 and "1 to 200 characters long, not 201" in too_long.stderr


def test_a_key_is_kept_as_long_as_its_pipeline(backend: Any) -> None:
    """The documented rule (#25, docs/concepts.md "Creation keys"): a key names its pipeline
    while the pipeline is stored; once retention purges it, the key is free again, as a
    workflow id is in Temporal and DBOS. Keep pipelines longer than callers retry."""
    from datetime import timedelta

    from prorch import FakeClock

    clock = FakeClock()
    orchestrator = purging_orchestrator(backend, clock)
    first = KeyRacePipeline.create(backend, {"order": 1}, key="order-1", clock=clock)
    orchestrator.execute_pipelines()
    clock.advance(29 * 86400)
    assert orchestrator.purge(timedelta(days=30)).pipelines == 0
    again = KeyRacePipeline.create(backend, {"order": 1}, key="order-1", clock=clock)
    assert (again.created, again.uuid) == (False, first.uuid)  # within retention: the same pipeline
    clock.advance(2 * 86400)
    assert orchestrator.purge(timedelta(days=30)).pipelines == 1
    after = KeyRacePipeline.create(backend, {"order": 1}, key="order-1", clock=clock)
    assert (after.created, after.uuid) == (True, first.uuid)  # purged: the key creates a new pipeline
    assert orchestrator.get(after.uuid).pipeline.status.value == "pending"


def advisory_locks(url: str) -> int:
    """The advisory locks held in the server's lock table now, seen from a connection of its own."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")).scalar())
    finally:
        engine.dispose()


@pytest.mark.slow
def test_a_keyed_create_many_holds_a_bounded_number_of_locks_on_postgresql(postgres_url: str) -> None:
    """Regression: a keyed ``create_many`` took one advisory lock per key in its transaction, and
    PostgreSQL's shared lock table (max_locks_per_transaction x connections: some 12,800 entries
    on the fixture server, max_connections 100) ran out: 20,000 keys failed with "out of shared
    memory". Creation keys now lock a bounded set of buckets, released with the transaction."""
    backend = from_url(postgres_url)
    store = Store(backend)
    with store.transaction():  # the locks of a 20,000-key batch, without storing 20,000 pipelines
        store.lock_keys([f"order-{n}" for n in range(20_000)])
        assert advisory_locks(postgres_url) == KEY_LOCK_BUCKETS  # each bucket once
    keys = [f"order-{n}" for n in range(1500)]
    with store.transaction():  # a batch's own transaction, held open to count its locks
        made = KeyRacePipeline.create_many(backend, [{"order": n} for n in range(len(keys))], keys=keys)
        held = advisory_locks(postgres_url)
    assert 0 < held <= KEY_LOCK_BUCKETS < len(keys)
    assert advisory_locks(postgres_url) == 0
    assert all(p.created for p in made) and len({p.uuid for p in made}) == len(keys)
    assert Orchestrator(backend).query(name="KeyRacePipeline", limit=1, count=True).total == len(keys)
    again = KeyRacePipeline.create_many(backend, [{"order": n} for n in range(100)], keys=keys[:100])
    assert not any(p.created for p in again)  # the keys still name their pipelines
    with store.transaction():  # a create_many without keys takes no key lock
        plain = KeyRacePipeline.create_many(backend, [{"order": n} for n in range(1000)])
        assert advisory_locks(postgres_url) == 0
    assert len({p.uuid for p in plain}) == 1000


def selects_of_a_keyed_create_many(tmp_path: Path, n: int) -> list[str]:
    """The SELECTs a keyed ``create_many`` of ``n`` new keys runs on a real SQLite file: every
    statement through SQLAlchemy (``before_cursor_execute``) and through the driver's cursor
    (the backend's fast path, which SQLAlchemy's events do not see: sqlite3's trace callback,
    set on each connection as the pool hands it out)."""
    backend = from_url(f"sqlite:///{tmp_path / f'keys-{n}.db'}")
    KeyRacePipeline.create(backend, {"order": -1}, key="warm-up")  # the schema and the pool made
    statements: list[str] = []

    def through_sqlalchemy(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    def through_the_driver(dbapi_connection: Any, *args: Any) -> None:
        dbapi_connection.set_trace_callback(statements.append)

    event.listen(backend.engine, "before_cursor_execute", through_sqlalchemy)
    event.listen(backend.engine, "checkout", through_the_driver)
    made = KeyRacePipeline.create_many(backend, [{"order": i} for i in range(n)], keys=[f"k-{i}" for i in range(n)])
    event.remove(backend.engine, "checkout", through_the_driver)
    event.remove(backend.engine, "before_cursor_execute", through_sqlalchemy)
    backend.engine.dispose()  # the traced connections closed
    assert all(p.created for p in made) and len({p.uuid for p in made}) == n
    return [statement for statement in statements if statement.lstrip().upper().startswith("SELECT")]


def test_a_keyed_create_many_looks_up_its_keys_in_a_few_queries(tmp_path: Path) -> None:
    """Regression: a keyed ``create_many`` read each key's pipeline by its uuid, one query per
    key (20,000 keys: 20,000 round trips, 37 s on PostgreSQL). It now reads the stored
    pipelines of its uuids and keys a chunk of values per query, whatever the batch's size."""
    few, many = (len(selects_of_a_keyed_create_many(tmp_path, n)) for n in (10, 1000))
    assert many <= few + 4, f"{few} SELECTs for 10 keys, {many} for 1,000"
    assert many < 20


def test_a_keyed_create_many_finds_each_kind_of_stored_pipeline_of_its_keys(backend: Any) -> None:
    """The batch's reads by uuid and by key (a chunk per query) keep what key by key gave: an
    equal pipeline under the key's own uuid comes back, ended or not; a live one an ``attach``
    create stored under a uuid of its own holds the key; an ended one of those does not; a key
    twice in the batch is created once; one conflict stores nothing."""
    orchestrator = Orchestrator(backend)
    ended = KeyRacePipeline.create(backend, {"order": 3}, key="ended")
    gone = KeyRacePipeline.create(backend, {"order": 4}, key="gone-by", if_running="attach")
    orchestrator.execute_pipelines()
    equal = KeyRacePipeline.create(backend, {"order": 1}, key="equal")
    attached = KeyRacePipeline.create(backend, {"order": 2}, key="attached", if_running="attach")
    assert gone.uuid != uuid_for_key("gone-by") and attached.uuid != uuid_for_key("attached")
    keys = ["equal", "attached", "ended", "gone-by", "new", "new"]
    made = KeyRacePipeline.create_many(backend, [{"order": n} for n in (1, 2, 3, 4, 5, 5)], keys=keys)
    assert [p.created for p in made] == [False, False, False, True, True, False]
    assert [p.uuid for p in made] == [
        equal.uuid, attached.uuid, ended.uuid, uuid_for_key("gone-by"), uuid_for_key("new"), uuid_for_key("new"),
    ]  # fmt: skip
    assert made[2].record.status == Status.FINISHED
    with pytest.raises(KeyConflictError, match="key 'equal' already names pipeline KeyRacePipeline"):
        KeyRacePipeline.create_many(backend, [{"order": 7}, {"order": 9}], keys=["brand-new", "equal"])
    assert orchestrator.query(key="brand-new").pipelines == []
    assert orchestrator.query(name="KeyRacePipeline", limit=100, count=True).total == 6
