"""The PostgreSQL dialect of the SQL backend (``postgresql://...``): several workers on several
machines. Claims skip the rows another worker's claim has locked (``FOR UPDATE SKIP LOCKED``),
workers follow the server's clock, and schema upgrades take an advisory lock."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Select, text
from sqlalchemy.engine import URL

from prorch.records import to_utc
from repositories.sql import SQLBackend, SQLRepository

SCHEMA_LOCK = 7270712
"""The advisory lock key of schema upgrades ('prorch')."""


class PostgreSQLBackend(SQLBackend):
    """A PostgreSQL database through psycopg 3 (``pip install 'prorch[postgresql]'``). Reads
    run in autocommit: one round trip each instead of three (BEGIN, the read, COMMIT)."""

    reads_in_transaction = False

    def _create_engine(self, url: URL, options: dict[str, Any]) -> Engine:
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        return super()._create_engine(url, options)

    def server_time(self) -> datetime | None:
        """PostgreSQL's clock, which all workers follow (see ``SupportsServerClock``)."""
        with self._errors(), self.engine.connect() as connection:
            moment = connection.execute(text("SELECT clock_timestamp()")).scalar_one()
        return to_utc(moment)

    def lock_schema(self, connection: Connection) -> None:
        connection.execute(text(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})"))


class PostgreSQLRepository(SQLRepository):
    def lockable(self, due: Select[Any]) -> Select[Any]:
        return due.with_for_update(skip_locked=True)


PostgreSQLBackend.repository_class = PostgreSQLRepository
