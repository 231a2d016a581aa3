"""One statement per transition on PostgreSQL, all of a round's statements in one round trip.

A transition writes a pipeline (compare-and-set on its revision), its steps (the same), the
messages it consumed and its new records (events). Sent as separate statements, that is one
network round trip each. Here it is one statement of data-modifying CTEs: the pipeline's
compare-and-set first, and every other part conditioned on it (``EXISTS (SELECT FROM p)``), so
a refused pipeline writes nothing at all. A round's statements go through psycopg's pipeline
mode: sent together, their results read once, inside the round's one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import BigInteger, Float, Integer, Table

from prorch.model.jsonvalue import dumps
from prorch.model.records import JSONDict
from prorch.storage.repository import TransitionRows
from repositories.schema import column_kind

_CASTS = {"json": "::jsonb", "time": "::timestamptz", "plain": "", "bool": "::boolean"}


def _cast(column: Any) -> str:
    """The cast of a column's value in a VALUES list, whose column type PostgreSQL infers from
    its values: one NULL in every row is text, which an integer column refuses. A text column
    stays uncast: a cast to ``varchar(n)`` would truncate a value too long where the insert
    refuses it."""
    if isinstance(column.type, BigInteger):
        return "::bigint"
    if isinstance(column.type, Integer):
        return "::integer"
    if isinstance(column.type, Float):
        return "::double precision"
    return _CASTS[column_kind(column.type)]


class TransitionStatements:
    """Builds and runs the one-statement transitions for the four tables."""

    def __init__(self, tables: dict[str, Table]) -> None:
        self.tables = tables
        self.kinds = {
            model: {str(c.name): column_kind(c.type) for c in table.columns} for model, table in tables.items()
        }
        self.casts = {model: {str(c.name): _cast(c) for c in table.columns} for model, table in tables.items()}

    def run(self, driver: Any, units: Sequence[TransitionRows]) -> list[tuple[bool, bool]]:
        """Run one statement per unit on ``driver`` (a psycopg connection, in a transaction):
        per unit, whether its pipeline was written and whether all its steps were."""
        cursors = []
        with driver.pipeline():
            for unit in units:
                sql, params = self.statement(unit)
                cursors.append(driver.execute(sql, params))
        outcomes = []
        for unit, cursor in zip(units, cursors, strict=True):
            pipeline_written, steps_written = cursor.fetchone()
            outcomes.append((pipeline_written == 1, steps_written == len(unit.steps)))
        return outcomes

    def statement(self, unit: TransitionRows) -> tuple[str, list[Any]]:
        model, uuid, expected, data = unit.pipeline
        params: list[Any] = []
        parts = []
        settable, values = self._set(model, data)
        parts.append(
            f'p AS (UPDATE "{self.tables[model].name}" SET {settable} WHERE uuid = %s AND revision = %s RETURNING 1)'
        )
        params += [*values, uuid, expected]
        counted = []
        for index, (step_model, step_uuid, step_expected, step_data) in enumerate(unit.steps):
            settable, values = self._set(step_model, step_data)
            parts.append(
                f's{index} AS (UPDATE "{self.tables[step_model].name}" SET {settable} '
                f"WHERE uuid = %s AND revision = %s AND EXISTS (SELECT FROM p) RETURNING 1)"
            )
            params += [*values, step_uuid, step_expected]
            counted.append(f"(SELECT count(*) FROM s{index})")
        for index, (other_model, other_uuid, other_data) in enumerate(unit.updates):
            settable, values = self._set(other_model, other_data)
            parts.append(
                f'u{index} AS (UPDATE "{self.tables[other_model].name}" SET {settable} '
                f"WHERE uuid = %s AND EXISTS (SELECT FROM p))"
            )
            params += [*values, other_uuid]
        for index, (new_model, rows) in enumerate(_grouped(unit.added)):
            parts.append(self._insert(f"i{index}", new_model, rows, params, "WHERE EXISTS (SELECT FROM p)"))
        steps_written = " + ".join(counted) or "0"
        sql = "WITH " + ", ".join(parts) + f" SELECT (SELECT count(*) FROM p), {steps_written}"
        return sql, params

    def inserts(self, added: Sequence[tuple[str, JSONDict]], channel: str | None) -> tuple[str, list[Any]]:
        """New records (whole rows) in one statement, with the NOTIFY of ``channel`` when given:
        run in autocommit, a create is one round trip where BEGIN, an INSERT per table, the
        NOTIFY and COMMIT were five or six. One statement is one transaction: all or nothing."""
        params: list[Any] = []
        parts = [
            self._insert(f"i{index}", model, rows, params, "") for index, (model, rows) in enumerate(_grouped(added))
        ]
        if channel is None:
            return "WITH " + ", ".join(parts) + " SELECT 1", params
        params.append(channel)
        return "WITH " + ", ".join(parts) + " SELECT pg_notify(%s, '')", params

    def _insert(self, name: str, model: str, rows: list[JSONDict], params: list[Any], condition: str) -> str:
        """The CTE ``name`` inserting ``rows`` of ``model`` (their values appended to ``params``)."""
        kinds, casts = self.kinds[model], self.casts[model]
        names = list(kinds)
        row_text = "(" + ", ".join(f"%s{casts[column]}" for column in names) + ")"
        quoted = ", ".join(f'"{column}"' for column in names)
        for row in rows:
            params += [self._value(kinds[column], row.get(column)) for column in names]
        return (
            f'{name} AS (INSERT INTO "{self.tables[model].name}" ({quoted}) '
            f"SELECT * FROM (VALUES {', '.join([row_text] * len(rows))}) AS v({quoted}) {condition})"
        )

    def _set(self, model: str, data: JSONDict) -> tuple[str, list[Any]]:
        kinds = self.kinds[model]
        names = [name for name in data if name in kinds and name != "uuid"]
        settable = ", ".join(f'"{name}" = %s{_CASTS[kinds[name]]}' for name in names) or '"uuid" = "uuid"'
        return settable, [self._value(kinds[name], data[name]) for name in names]

    @staticmethod
    def _value(kind: str, value: Any) -> Any:
        if kind == "json":
            return dumps(value)
        return value


def _grouped(added: Sequence[tuple[str, JSONDict]]) -> list[tuple[str, list[JSONDict]]]:
    groups: list[tuple[str, list[JSONDict]]] = []
    for model, row in added:
        if groups and groups[-1][0] == model:
            groups[-1][1].append(row)
        else:
            groups.append((model, [row]))
    return groups
