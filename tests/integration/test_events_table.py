"""Migration 0007: events are clustered by pipeline (primary key pipeline_uuid, seq, uuid; on
SQLite a WITHOUT ROWID table), the history a 0006 store holds survives the upgrade in order, and
the downgrade gives the old shape back with the same rows."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect, text

from prorch import Orchestrator
from repositories.sql import MIGRATIONS, SQLBackend, upgrade

EVENTS = [("e-late", "p-1", 2001), ("e-early", "p-1", 1000), ("e-other", "p-2", 1000), ("e-mid", "p-1", 1001)]


def driver_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"
    return str(request.getfixturevalue("postgres_url"))


def store_at_0006_with_history(url: str) -> None:
    old = SQLBackend(url, migrate=False)
    upgrade(old, "0006")
    old.dispose()
    engine = create_engine(driver_url(url))
    with engine.begin() as connection:
        for uuid, pipeline_uuid, seq in EVENTS:
            connection.execute(
                text(
                    "INSERT INTO pipeline_events (uuid, pipeline_uuid, step_uuid, type, at, seq, data) "
                    "VALUES (:u, :p, NULL, 'step.finished', '2026-01-01 00:00:00', :s, '{}')"
                ),
                {"u": uuid, "p": pipeline_uuid, "s": seq},
            )
    engine.dispose()


def shape(url: str) -> tuple[list[str], list[list[str | None]], str]:
    engine = create_engine(driver_url(url))
    with engine.connect() as connection:
        inspector = inspect(connection)
        key = inspector.get_pk_constraint("pipeline_events")["constrained_columns"]
        indexes = [index["column_names"] for index in inspector.get_indexes("pipeline_events")]
        ddl = ""
        if engine.dialect.name == "sqlite":
            ddl = connection.execute(text("SELECT sql FROM sqlite_master WHERE name = 'pipeline_events'")).scalar_one()
    engine.dispose()
    return key, indexes, ddl


def test_upgrade_clusters_events_and_keeps_the_history_in_order(url: str) -> None:
    store_at_0006_with_history(url)
    backend = SQLBackend(url)  # upgrades to 0007 on first use
    key, indexes, ddl = shape(url)
    assert key == ["pipeline_uuid", "seq", "uuid"]
    assert indexes == []  # the key serves every read: no second B-tree to insert into
    if url.startswith("sqlite"):
        assert "WITHOUT ROWID" in ddl
    history = Orchestrator(backend).store.events_of("p-1")
    assert [event.uuid for event in history] == ["e-early", "e-mid", "e-late"]
    backend.dispose()


def test_downgrade_gives_the_old_shape_back_with_the_same_rows(url: str) -> None:
    store_at_0006_with_history(url)
    SQLBackend(url).dispose()
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(driver_url(url))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0006")
    with engine.connect() as connection:
        rows = sorted(connection.execute(text("SELECT uuid, pipeline_uuid, seq FROM pipeline_events")).all())
    engine.dispose()
    key, indexes, ddl = shape(url)
    assert key == ["uuid"]
    assert indexes == [["pipeline_uuid"]]
    assert "WITHOUT ROWID" not in ddl
    assert rows == sorted(EVENTS)
