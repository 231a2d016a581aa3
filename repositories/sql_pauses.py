"""Pauses in SQL (the ``pauses`` table, ``prorch.model.pauses``): one row per paused scope, and
the claim's filter that leaves out the pipelines a pause holds."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import (
    ColumnElement,
    Connection,
    String,
    Table,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import JSONB

from prorch.model.pauses import CLASS, PIPELINE, TENANT
from prorch.model.records import JSONDict, format_timestamp, to_utc
from repositories.schema import pauses, rate_limit_starts


class SQLBackend(Protocol):
    """What these functions use of ``repositories.sql.SQLBackend`` (named here: no import cycle)."""

    def _errors(self) -> contextlib.AbstractContextManager[None]: ...
    def connect(self, *, write: bool) -> contextlib.AbstractContextManager[Connection]: ...


def not_paused(table: Table, dialect: str) -> ColumnElement[bool]:
    """No pause holds the pipeline: a NOT EXISTS over the pipeline's scope keys (its class, its
    class version, its tenant, itself), each a lookup of the pauses' primary key, so an empty
    table costs a claim one probe per row it reads, and a pause of a class costs one row."""
    c = table.c
    keys = [
        literal(f"{CLASS}:") + c.name,
        literal(f"{CLASS}:") + c.name + literal("@") + cast(c.version, String),
        literal(f"{PIPELINE}:") + c.uuid,
        literal(f"{TENANT}:") + _tenant_text(c.context, dialect),
    ]
    # the uncorrelated test is evaluated once per statement: with no pause stored (the usual
    # case), the rows' keys are never built (measured: +30% CPU per claim without it)
    return or_(~exists().select_from(pauses), ~exists().where(pauses.c.scope.in_(keys)))


def _tenant_text(context: Any, dialect: str) -> ColumnElement[Any]:
    """The context's tenant as text when it is a text or an integer, as ``tenant_text`` takes it
    (NULL for none and for other values: no tenant pause holds it). The type is checked, not
    only the text: a tenant ``2.5`` or ``true`` read as text ("2.5", SQLite's "1" for true) was
    held by a pause of that text here and by none on memory and TinyDB, nor in the display."""
    if dialect == "postgresql":
        tenant = type_coerce(context, JSONB)["tenant"]
        kind, text = func.jsonb_typeof(tenant), tenant.astext
        integral = (kind == "number") & text.regexp_match("^-?[0-9]+$")
        return case(((kind == "string") | integral, text), else_=null())
    path = literal('$."tenant"')
    kind = func.json_type(context, path)
    return case((kind.in_(("text", "integer")), cast(func.json_extract(context, path), String)), else_=null())


def rate_starts(backend: SQLBackend, name: str, since: datetime) -> int:
    """A rate-limited name's stored claims after ``since`` (for the display: a read, no lock)."""
    c = rate_limit_starts.c
    with backend._errors(), backend.connect(write=False) as connection:
        query = select(func.count()).where(c.name == name, c.started_at > since)
        return int(connection.execute(query).scalar_one())


def pause_rows(backend: SQLBackend) -> list[JSONDict]:
    with backend._errors(), backend.connect(write=False) as connection:
        rows = connection.execute(select(pauses)).mappings().all()
    return [{**row, "since": format_timestamp(to_utc(row["since"]))} for row in rows]


def insert_pause(backend: SQLBackend, row: JSONDict) -> bool:
    """Insert unless the scope is paused already (a lookup first; two at once meet on the key)."""
    values = {column.name: row.get(column.name) for column in pauses.columns}
    values["since"] = to_utc(datetime.fromisoformat(str(row["since"])))
    with backend._errors(), backend.connect(write=True) as connection:
        if connection.execute(select(pauses.c.scope).where(pauses.c.scope == values["scope"])).first() is not None:
            return False
        connection.execute(insert(pauses).values(**values))
        return True


def delete_pause(backend: SQLBackend, scope: str) -> JSONDict | None:
    with backend._errors(), backend.connect(write=True) as connection:
        found = connection.execute(delete(pauses).where(pauses.c.scope == scope).returning(*pauses.columns)).mappings()
        row = found.first()
    return None if row is None else {**row, "since": format_timestamp(to_utc(row["since"]))}


__all__ = ["delete_pause", "insert_pause", "not_paused", "pause_rows"]
