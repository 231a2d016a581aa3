"""HOT-friendly pipeline rows on PostgreSQL (#28 item 4, migration 0017): a pipeline's writes
that change no indexed column (the hook mark, the transitions that do not end it) are heap-only
updates, and the migration moves the two indexes off the columns every write changes and back."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, delete, event, insert, inspect, text, update

from prorch import Orchestrator
from prorch.model.records import Metadata, new_uuid
from prorch.model.registry import Registry
from repositories import from_url
from repositories.schema import pipelines
from repositories.sql import MIGRATIONS, SQLBackend, upgrade
from tests.support.builders import pipeline_of, step_of

ENDED_AT = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)


def table_counters(url: str, table: str) -> tuple[int, int]:
    """(updates, HOT updates) of ``table`` in the shared statistics, once a write has reached them
    (a backend sends its counters at most once a second, and at its exit)."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    query = text("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = :table")
    deadline = time.monotonic() + 10
    try:
        while True:
            with engine.connect() as connection:
                updates, hot = connection.execute(query, {"table": table}).one()
            if updates or time.monotonic() > deadline:
                return int(updates), int(hot)
            time.sleep(0.2)
    finally:
        engine.dispose()


@pytest.mark.parametrize("max_running", [None, 5], ids=["unlimited", "max_running"])
def test_only_a_pipelines_end_touches_an_index(postgres_url: str, registry: Registry, max_running: int | None) -> None:
    """Regression (#28 item 4): 0 of a pipeline's updates were HOT, since ``updated_at`` and
    ``lease_expires_at``, which every write changes, were index keys (0017 made all but 2 HOT);
    then the claim was not, since it sets the lease's owner, which ``ix_pipelines_leased`` held.
    Now the leases of limited names are in their own table (0023): only the end (status, due
    time) changes an indexed column; the steps' updates never do. While a hook of a limited
    name runs, its lease is in that table, and the release takes it out; an unlimited name's
    leases never go there."""
    leases: list[int] = []

    def count_leases(self: Any) -> None:
        engine = create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.connect() as connection:
            leases.append(connection.exec_driver_sql("SELECT count(*) FROM pipeline_leases").scalar_one())
        engine.dispose()

    steps = [step_of("Hot0", count_leases), *(step_of(f"Hot{i}", lambda self: None) for i in (1, 2))]
    backend = from_url(postgres_url)
    pipeline_of(*steps, name="Hot", max_running=max_running).create(backend, {})
    orchestrator = Orchestrator(backend, registry=registry)
    while orchestrator.execute_pipelines().claimed:
        pass
    with backend.engine.connect() as connection:
        left = connection.exec_driver_sql("SELECT count(*) FROM pipeline_leases").scalar_one()
    backend.dispose()  # its connections close: their counters reach the statistics
    assert leases == [0 if max_running is None else 1] and left == 0, (leases, left)
    updates, hot = table_counters(postgres_url, "pipelines")
    assert updates >= 4, updates  # the claim, the end and the writes between
    assert updates - hot == 1, f"{updates - hot} of {updates} pipeline updates were not HOT"
    step_updates, step_hot = table_counters(postgres_url, "pipeline_steps")
    assert step_updates >= 3 and step_hot == step_updates, (step_updates, step_hot)


def stored_row(status: str, **changes: Any) -> dict[str, Any]:
    return {
        "uuid": new_uuid(), "name": "Old", "version": 1, "status": status, "params": {}, "context": {},
        "metadata": {}, "priority": 0, "created_at": ENDED_AT, "updated_at": ENDED_AT, "claims": 0,
        "next_run_at": None, "revision": 0, "cancel_requested": False, "hook_shared": False, "crashes": 0,
        "lease_owner": None, "lease_expires_at": None, **changes,
    }  # fmt: skip


def index_definitions(connection: Any) -> dict[str, str]:
    if connection.dialect.name == "postgresql":
        query = "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'pipelines'"
    else:
        query = "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'pipelines'"
    return {str(name): str(sql) for name, sql in connection.exec_driver_sql(query)}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_migration_0017_moves_the_indexes_off_changing_columns_and_back(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    old = SQLBackend(url, migrate=False)
    upgrade(old, "0016")
    ended, running = stored_row("finished"), stored_row("pending", lease_owner="w", lease_expires_at=ENDED_AT)
    with old.engine.begin() as connection:
        connection.execute(insert(pipelines), [ended, running])
    upgrade(old)  # to this prorch's newest
    with old.engine.connect() as connection:
        indexes = index_definitions(connection)
        if kind == "postgresql":
            assert "ix_pipelines_leased" not in indexes, indexes  # in pipeline_leases since 0023
        else:
            assert "(name, lease_owner)" in indexes["ix_pipelines_leased"], indexes
            assert "lease_owner IS NOT NULL" in indexes["ix_pipelines_leased"], indexes
        if kind == "postgresql":
            assert "(ended_at)" in indexes["ix_pipelines_ended"], indexes
            found = dict(connection.exec_driver_sql("SELECT uuid, ended_at FROM pipelines").all())
            assert found == {ended["uuid"]: ENDED_AT, running["uuid"]: None}  # computed for stored rows
            options = connection.exec_driver_sql("SELECT reloptions FROM pg_class WHERE relname = 'pipelines'")
            assert "fillfactor=40" in options.scalar_one()  # 0017's 60, lowered by 0023
        else:
            assert "(updated_at)" in indexes["ix_pipelines_ended"], indexes
    plans: list[str] = []

    def explain(connection: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if "ended_at" in statement:  # could the planner use the index, were the table large?
            cursor.execute("SET enable_seqscan = off")
            cursor.execute("EXPLAIN " + statement, params)
            plans.append(" ".join(line for (line,) in cursor.fetchall()))
            cursor.execute("RESET enable_seqscan")

    event.listen(old.engine, "before_cursor_execute", explain)
    stats = old.pipeline_stats(ENDED_AT, ENDED_AT - timedelta(hours=1))  # the ended query, on its new index
    assert [status for status, _ in stats.ended] == ["finished"]
    assert old.ended_before(["finished"], ENDED_AT + timedelta(seconds=1), 10) == [ended["uuid"]]
    event.remove(old.engine, "before_cursor_execute", explain)
    assert len(plans) == (2 if kind == "postgresql" else 0), plans
    assert all("ix_pipelines_ended" in plan for plan in plans), plans
    downgrade_to(old, "0016")
    with old.engine.connect() as connection:
        indexes = index_definitions(connection)
        assert "(name, lease_expires_at)" in indexes["ix_pipelines_leased"], indexes
        assert "(updated_at)" in indexes["ix_pipelines_ended"], indexes
        if kind == "postgresql":
            columns = connection.exec_driver_sql(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'pipelines'"
            )
            assert "ended_at" not in {name for (name,) in columns}
    old.dispose()


def downgrade_to(backend: SQLBackend, revision: str) -> None:
    with backend.engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_migration_0023_moves_the_leases_to_their_own_table_and_back(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """On PostgreSQL 0023 adds ``pipeline_leases`` and ``pipeline_limited_names`` and drops
    ``ix_pipelines_leased``, and its downgrade puts the index back and drops the tables and
    their triggers; on SQLite it changes nothing."""
    url = f"sqlite:///{tmp_path / 'old.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    old = SQLBackend(url, migrate=False)
    upgrade(old, "0022")
    leased = stored_row("pending", lease_owner="w", lease_expires_at=ENDED_AT)
    with old.engine.begin() as connection:
        connection.execute(insert(pipelines), [stored_row("pending"), leased, stored_row("finished")])
    upgrade(old)  # to this prorch's newest
    if kind == "postgresql":  # a name entered copies its stored leases; the downgrade drops them
        with old.engine.connect() as connection:
            assert old(Metadata.PIPELINES_MODEL).leases_in_table(connection, "Old")
            side = connection.exec_driver_sql("SELECT pipeline_uuid, name FROM pipeline_leases").all()
        assert [tuple(found) for found in side] == [(leased["uuid"], "Old")]
    with old.engine.connect() as connection:
        indexes = index_definitions(connection)
        tables = set(inspect(connection).get_table_names())
        if kind == "postgresql":  # the stored leases are copied by a name's first limited claim
            assert "ix_pipelines_leased" not in indexes, indexes
            assert {"pipeline_leases", "pipeline_limited_names"} <= tables, tables
            options = connection.exec_driver_sql("SELECT reloptions FROM pg_class WHERE relname = 'pipelines'")
            assert "fillfactor=40" in options.scalar_one()
        else:
            assert "(name, lease_owner)" in indexes["ix_pipelines_leased"], indexes
            assert "pipeline_leases" not in tables
    downgrade_to(old, "0022")
    with old.engine.connect() as connection:
        indexes = index_definitions(connection)
        assert "(name, lease_owner)" in indexes["ix_pipelines_leased"], indexes
        assert "lease_owner IS NOT NULL" in indexes["ix_pipelines_leased"], indexes
        assert not {"pipeline_leases", "pipeline_limited_names"} & set(inspect(connection).get_table_names())
        if kind == "postgresql":
            options = connection.exec_driver_sql("SELECT reloptions FROM pg_class WHERE relname = 'pipelines'")
            assert "fillfactor=60" in options.scalar_one()
    with old.engine.begin() as connection:  # no trigger is left behind to write to the dropped table
        connection.execute(update(pipelines).values(lease_owner="v"))
        connection.execute(delete(pipelines))
    old.dispose()
