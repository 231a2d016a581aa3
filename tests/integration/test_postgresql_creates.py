"""A ``create()`` on PostgreSQL is one statement in autocommit (its rows and its NOTIFY), and
stores exactly the rows the table-by-table path stores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from prorch.model.exceptions import DuplicateRecordError, StoreUnreachableError
from prorch.model.records import PipelineRecord, Record, StepRecord, new_uuid
from prorch.model.registry import Registry
from prorch.model.status import Status
from repositories.postgresql import PostgreSQLBackend
from repositories.postgresql_transitions import TransitionStatements
from repositories.schema import TABLES
from repositories.sql import SQLRepository
from tests.integration.conftest import new_database
from tests.integration.test_group_commit import count_calls
from tests.integration.test_store_outages import kill_backends
from tests.support.builders import pipeline_of, step_of
from tests.support.postgres import PostgresServer


def stored_rows(url: str) -> dict[str, list[Any]]:
    """Every row of prorch's tables, whole, as PostgreSQL's text of the row (where SQL NULL and
    JSON null differ), in uuid order."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as connection:
        found = {
            table.name: list(connection.execute(text(f'SELECT t::text FROM "{table.name}" t ORDER BY uuid')).scalars())
            for table in TABLES.values()
        }
    engine.dispose()
    return found


class Inserted(list[list[Record]]):
    """The records of each ``PostgreSQLBackend.insert`` call; ``original`` is the real method."""

    original = staticmethod(PostgreSQLBackend.insert)


def spy_inserts(monkeypatch: pytest.MonkeyPatch) -> Inserted:
    inserted = Inserted()

    def spy(self: PostgreSQLBackend, records: Sequence[Record]) -> None:
        inserted.append(list(records))
        inserted.original(self, records)

    monkeypatch.setattr(PostgreSQLBackend, "insert", spy)
    return inserted


def test_a_create_is_one_statement_and_stores_what_the_table_by_table_path_stores(
    postgres_server: PostgresServer, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = PostgreSQLBackend(new_database(postgres_server)), PostgreSQLBackend(new_database(postgres_server))
    pipeline = pipeline_of(*(step_of(name, lambda self: None) for name in "ABC"))
    inserted = spy_inserts(monkeypatch)
    original = inserted.original
    statements = count_calls(monkeypatch, TransitionStatements, "inserts")
    separate = count_calls(monkeypatch, SQLRepository, "save_many")
    pipeline.create(
        first,
        params={"nested": {"list": [1, 2.5, None, "é"], "empty": {}}},
        context={"tenant": "acme"},
        priority=7,
        registry=registry,
    )
    assert len(statements) == 1 and not separate
    with second.transaction():  # inside a transaction: the table-by-table path
        original(second, inserted[0])
    assert len(separate) >= 3  # pipelines, steps and events, one insert each
    assert stored_rows(first.url) == stored_rows(second.url)
    first.dispose()
    second.dispose()


def test_a_uuid_stored_already_is_a_duplicate_on_the_one_statement_path(
    postgres_url: str, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = PostgreSQLBackend(postgres_url)
    pipeline = pipeline_of(step_of("A", lambda self: None))
    inserted = spy_inserts(monkeypatch)
    original = inserted.original
    pipeline.create(backend, registry=registry)
    with pytest.raises(DuplicateRecordError):
        original(backend, inserted[0])
    assert len(stored_rows(postgres_url)["pipelines"]) == 1  # nothing of the second insert stored
    backend.dispose()


def test_a_column_none_in_every_row_is_stored_as_on_the_table_by_table_path(postgres_server: PostgresServer) -> None:
    """A VALUES column whose every value is NULL is text to PostgreSQL: the integer ``position``
    of a step without one (as in a prorch 1.0.1 store) was refused ("column is of type integer
    but expression is of type text")."""
    first, second = PostgreSQLBackend(new_database(postgres_server)), PostgreSQLBackend(new_database(postgres_server))
    pipeline = PipelineRecord(uuid=new_uuid(), name="Old", status=Status.PENDING)
    records = [
        *(StepRecord(uuid=new_uuid(), pipeline_uuid=pipeline.uuid, name=name, status=Status.CREATED) for name in "AB"),
        pipeline,
    ]
    first.insert(records)
    with second.transaction():
        second.insert(records)
    assert len(stored_rows(first.url)["pipeline_steps"]) == 2
    assert stored_rows(first.url) == stored_rows(second.url)
    first.dispose()
    second.dispose()


def test_a_create_on_a_killed_connection_is_a_store_error_and_the_next_one_is_stored(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    """The one-statement create runs on the driver, unseen by SQLAlchemy: a connection the
    server killed is a ``StoreUnreachableError`` with nothing stored, and is not handed out
    again (inside ``pinned()``, where no pre-ping looks first); one killed in the pool is
    replaced by the pool's pre-ping."""
    backend = PostgreSQLBackend(postgres_url)
    database = postgres_url.rsplit("/", 1)[1]

    def record() -> PipelineRecord:
        return PipelineRecord(uuid=new_uuid(), name="P", status=Status.PENDING)

    backend.insert([record()])
    assert kill_backends(postgres_server, database) >= 1
    backend.insert([record()])  # pooled: the pre-ping replaced it
    with backend.pinned():
        backend.insert([record()])
        assert kill_backends(postgres_server, database) >= 1
        with pytest.raises(StoreUnreachableError):
            backend.insert([record()])
        backend.insert([record()])
    assert len(stored_rows(postgres_url)["pipelines"]) == 4
    backend.dispose()
