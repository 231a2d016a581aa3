"""Worker rows in SQL (the ``workers`` table): a heartbeat is one upsert, a clean stop one delete."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Protocol

from sqlalchemy import Connection, delete, insert, select, update

from prorch.model.records import JSONDict, format_timestamp, to_utc
from repositories.schema import workers


class SQLBackend(Protocol):
    """What these functions use of ``repositories.sql.SQLBackend`` (named here: no import cycle)."""

    def _errors(self) -> contextlib.AbstractContextManager[None]: ...
    def connect(self, *, write: bool) -> contextlib.AbstractContextManager[Connection]: ...


TIMES = ("started_at", "heartbeat_at")


def upsert_worker(backend: SQLBackend, row: JSONDict) -> None:
    """Update first, insert when no row was there (a worker's id is its own: no race)."""
    values = {k: (to_utc(datetime.fromisoformat(str(v))) if k in TIMES else v) for k, v in row.items()}
    with backend._errors(), backend.connect(write=True) as connection:
        moved = connection.execute(update(workers).where(workers.c.id == values["id"]).values(**values))
        if not moved.rowcount:
            connection.execute(insert(workers).values(**values))


def delete_worker(backend: SQLBackend, worker_id: str) -> None:
    with backend._errors(), backend.connect(write=True) as connection:
        connection.execute(delete(workers).where(workers.c.id == worker_id))


def worker_rows(backend: SQLBackend) -> list[JSONDict]:
    with backend._errors(), backend.connect(write=False) as connection:
        rows = connection.execute(select(workers)).mappings().all()
    return [{k: (format_timestamp(to_utc(v)) if k in TIMES else v) for k, v in row.items()} for row in rows]
