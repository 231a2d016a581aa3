"""The per-transition statements on SQLite, run on the DBAPI connection itself.

SQLAlchemy builds, caches and processes every execution generically, which costs several times
what SQLite needs for one of prorch's small statements. For the statements run on every
transition (get, search, insert, full-row update and compare-and-set), this module keeps the
SQL text (written from the same ``Table`` declarations) and converts values itself, in exactly
the formats SQLAlchemy's SQLite dialect uses (JSON as text, ``null`` for None; timestamps as
``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC; booleans as 0/1), so that rows written by either path
read back the same through the other. The claim's statement is SQLAlchemy's, compiled once
(``DriverStatement``) and run here too, its rows read as ``get``'s are. Everything else
(migrations, listings, limited claims) stays in SQLAlchemy.
"""

from __future__ import annotations

import enum
import functools
import operator
import typing
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any, cast

import msgspec
from sqlalchemy import ClauseElement, Dialect, Table
from sqlalchemy.sql.compiler import SQLCompiler

from prorch.model.jsonvalue import dumps, loads
from prorch.model.records import JSONDict, Record, format_timestamp, to_utc
from repositories.schema import column_kind


def _db_time(value: Any) -> str | None:
    """A record's timestamp (our fixed-width UTC ISO text) as SQLAlchemy stores it on SQLite.
    Cached (by the text, or the UTC time: two local times of a repeated hour are equal keys):
    one transition writes the same few times in several columns and rows."""
    if isinstance(value, datetime) and value.tzinfo is not timezone.utc:
        value = to_utc(value)
    return _db_time_cached(value)


@functools.lru_cache(maxsize=256)
def _db_time_cached(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and len(value) == 32 and value.endswith("+00:00"):
        return value[:10] + " " + value[11:26]  # "2030-01-01T00:00:00.000000+00:00"
    moment = to_utc(value if isinstance(value, datetime) else datetime.fromisoformat(value))
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def _record_time(value: str) -> str:
    if len(value) == 26:
        return value[:10] + "T" + value[11:] + "+00:00"
    return format_timestamp(datetime.fromisoformat(value))


class SQLiteFastPath:
    """SQL text and value conversion for one table."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.names = [str(column.name) for column in table.columns]  # plain str, see SQLRepository
        self.kinds = [column_kind(column.type) for column in table.columns]
        self.defaults = {c.name: getattr(c.default, "arg", None) for c in table.columns}
        # one (name, default, converter) per column, so that a row is one loop without branches
        self.encoders = [
            (name, self.defaults[name], ENCODERS[kind]) for name, kind in zip(self.names, self.kinds, strict=True)
        ]
        self.encoders_without_uuid = [entry for entry in self.encoders if entry[0] != "uuid"]
        self.decoders = [
            (name, DECODERS[kind]) for name, kind in zip(self.names, self.kinds, strict=True) if kind in DECODERS
        ]
        self.required = frozenset(self.names) - {"uuid"}
        quoted = [f'"{name}"' for name in self.names]
        settable = [f'"{name}" = ?' for name in self.names if name != "uuid"]
        self.select = f'SELECT {", ".join(quoted)} FROM "{table.name}"'
        self.insert = f'INSERT INTO "{table.name}" ({", ".join(quoted)}) VALUES ({", ".join("?" * len(quoted))})'
        self.update = f'UPDATE "{table.name}" SET {", ".join(settable)} WHERE uuid = ?'
        self.compare_and_set = self.update + " AND revision = ?"
        self.order = ' ORDER BY "seq", "at"' if "seq" in self.names else ""
        self.encoder_of = {name: encode for name, _, encode in self.encoders}
        self._partial: dict[tuple[str, ...], tuple[str, list[tuple[str, Any]]]] = {}
        self._plans: dict[type[Record], tuple[Callable[[Any], Any], list[tuple[int, Callable[[Any], Any]]]]] = {}

    def changes(self, data: JSONDict) -> tuple[str, list[Any]]:
        """An UPDATE (compare-and-set: its last two parameters are the uuid and the expected
        revision) of the columns in ``data`` only, and their values; keys that are not columns
        are left out, as SQLAlchemy's path does. Worked out once per set of keys (a transition
        changes the same few fields again and again)."""
        keys = tuple(data)
        plan = self._partial.get(keys) or self._partial_plan(keys)
        sql, encoders = plan
        return sql, [data[name] if encode is None else encode(data[name]) for name, encode in encoders]

    def _partial_plan(self, keys: tuple[str, ...]) -> tuple[str, list[tuple[str, Any]]]:
        encoder_of = self.encoder_of
        names = [name for name in keys if name in encoder_of and name != "uuid"]
        settable = ", ".join(f'"{name}" = ?' for name in names) or '"uuid" = "uuid"'  # nothing: only compare
        sql = f'UPDATE "{self.table.name}" SET {settable} WHERE uuid = ? AND revision = ?'
        plan = self._partial[keys] = (sql, [(name, encoder_of[name]) for name in names])
        return plan

    def row(self, data: JSONDict, *, with_uuid: bool = True) -> list[Any]:
        get = data.get
        return [
            encode(get(name, default)) if encode is not None else get(name, default)
            for name, default, encode in (self.encoders if with_uuid else self.encoders_without_uuid)
        ]

    def rows_of(self, records: Sequence[Record]) -> list[list[Any]]:
        """The rows of new records of one class: exactly ``row(record.to_dict())``, read from
        the records' fields in place, without the dict (the events of every transition come
        here): the fields in column order, then a converter for each column that needs one."""
        order, converters = self._plans.get(type(records[0])) or self._plan(type(records[0]))
        astuple = msgspec.structs.astuple
        rows = []
        for record in records:
            row = list(order(astuple(record)))
            for at, convert in converters:
                row[at] = convert(row[at])
            rows.append(row)
        return rows

    def _plan(self, cls: type[Record]) -> tuple[Callable[[Any], Any], list[tuple[int, Callable[[Any], Any]]]]:
        """The record's fields in column order, and the conversion ``to_dict`` then ``row``
        make of each column's value where there is one."""
        fields: tuple[str, ...] = cls.__struct_fields__
        hints = typing.get_type_hints(cls)
        positions = [fields.index(name) for name in self.names]
        converters: list[tuple[int, Callable[[Any], Any]]] = []
        for at, (name, kind) in enumerate(zip(self.names, self.kinds, strict=True)):
            convert = _enum_value if kind == "plain" and _holds_enum(hints[name]) else _RECORD_ENCODERS[kind]
            if convert is not None:
                converters.append((at, convert))
        plan = self._plans[cls] = (_picker(positions), converters)
        return plan

    def record(self, values: Sequence[Any]) -> JSONDict:
        """A row as the record's data: one converter per column, none for most."""
        result = dict(zip(self.names, values, strict=True))
        for name, decode in self.decoders:
            value = result[name]
            if value is not None:
                result[name] = decode(value)
        return result

    def covers(self, data: JSONDict) -> bool:
        """True when ``data`` sets every column but the key (what the engine always writes)."""
        return self.required <= data.keys()


class DriverStatement:
    """A SQLAlchemy statement compiled once for the driver: its SQL text with ``?`` markers,
    the constants bound into it (pipeline names and versions, statuses) already converted, and
    the names of the values given at each run (converted by SQLAlchemy's own bind processors,
    so that the values are exactly what its path would send)."""

    def __init__(self, statement: ClauseElement, dialect: Dialect, given: Sequence[str]) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        expanded = compiled.construct_expanded_state(dict.fromkeys(given))
        self.sql: str = expanded.statement
        self.names: tuple[str, ...] = tuple(expanded.positiontup or ())
        processors = dict(expanded.processors)  # the expanded IN lists' only
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                processors.setdefault(name, process)
        self.processors = {name: processors[name] for name in given if name in processors}
        self.constants = {
            name: processors[name](value) if name in processors else value
            for name, value in expanded.parameters.items()
            if name not in self.processors and name not in given
        }

    def parameters(self, given: JSONDict) -> list[Any]:
        """The positional values of one run: ``given`` (converted) and the constants."""
        values = dict(self.constants)
        for name, value in given.items():
            convert = self.processors.get(name)
            values[name] = convert(value) if convert is not None and value is not None else value
        return [values[name] for name in self.names]


def _db_bool(value: Any) -> int | None:
    return None if value is None else int(value)


def db_json(value: Any) -> str | bytes:
    """A JSON value as SQLite stores it: its text, except a bare int beyond 64 bits, which goes
    as a BLOB: a JSON column has NUMERIC affinity, and SQLite would keep such a number, sent as
    text, as a REAL (15 exact digits). Both read back through ``loads``."""
    text = dumps(value)
    if type(value) is int and not _INT64_MIN <= value <= _INT64_MAX:
        return text.encode()
    return text


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
ENCODERS: dict[str, Any] = {"json": db_json, "time": _db_time, "bool": _db_bool, "plain": None}


def _record_json(value: Any) -> Any:
    """SQLite gives a JSON column NUMERIC affinity: a scalar such as 7 comes back a number."""
    return loads(value) if isinstance(value, (str, bytes)) else value


def _time_of(value: datetime | None) -> str | None:
    """A record's timestamp as ``to_dict`` then ``_db_time`` store it; a UTC one (the engine's)
    cached by its time."""
    if value is None:
        return None
    if value.tzinfo is timezone.utc:
        return _utc_db_time(value)
    return _db_time(format_timestamp(value))


@functools.lru_cache(maxsize=256)
def _utc_db_time(value: datetime) -> str | None:
    return _db_time(format_timestamp(value))


def _json_of(value: Any) -> str | bytes:
    """A record's JSON value as ``to_dict`` (msgspec's builtins) then ``db_json`` store it.
    A value the JSON encoders take as it is (every checked JSON value) encodes the same without
    the builtins copy; an error's struct does not, and takes it."""
    try:
        return db_json(value)
    except TypeError:
        return db_json(_to_builtins(value, builtin_types=_KEPT))


_to_builtins = msgspec.to_builtins
_KEPT = (datetime,)


def _picker(positions: list[int]) -> Callable[[Any], Any]:
    """A function of a tuple giving its items at ``positions`` (as a tuple)."""
    if len(positions) == 1:
        return lambda values: (values[positions[0]],)
    return operator.itemgetter(*positions)


def _enum_value(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _holds_enum(hint: Any) -> bool:
    """True when a field's type is an Enum, or a union with one, whose members are not text
    (``to_dict`` stores an Enum's value; the driver binds a ``str`` Enum's member as its text)."""
    kinds = typing.get_args(hint) or (hint,)
    return any(isinstance(k, type) and issubclass(k, enum.Enum) and not issubclass(k, str) for k in kinds)


_RECORD_ENCODERS: dict[str, Callable[[Any], Any] | None] = {
    "json": _json_of,
    "time": _time_of,
    "bool": _db_bool,
    "plain": None,
}
"""A record's field value as its column's, per column kind (``rows_of``)."""

DECODERS: dict[str, Any] = {"json": _record_json, "time": _record_time, "bool": bool}
"""A stored value (not None) as the record's, per column kind; a plain one as it is."""
