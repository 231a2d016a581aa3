"""``PipelineQuery`` as SQL: filters on the pipelines table, newest first by the keyset
(created_at, uuid), served by the listing indexes of migration 0008. JSON fields (a params
field, the tenant in context) are compared by JSON type as well as value, so that ``"1"``,
``1`` and ``true`` stay three different values."""

from __future__ import annotations

import functools
import json
from collections import Counter
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Connection,
    Integer,
    Select,
    Table,
    and_,
    bindparam,
    exists,
    func,
    literal,
    not_,
    null,
    or_,
    select,
    text,
    type_coerce,
    union_all,
)
from sqlalchemy.dialects.postgresql import JSONB

from prorch.model import substates
from prorch.model.records import to_utc
from prorch.storage.repository import PipelineQuery, PipelineStats, VersionGroup
from repositories.schema import ENDED, ENDED_AT, pipeline_attributes
from repositories.sql_pauses import not_paused

ENDED_STATUSES = frozenset({"finished", "failed", "cancelled"})
SAMPLES = 32
"""Pipelines read to guess the largest (status, name, version) group of the overview's counts."""
GroupCount = tuple[str, str, int, int]
"""(status, name, version, pipelines)."""
JSON_TYPES_SQLITE: dict[type, tuple[str, ...]] = {int: ("integer",), float: ("real", "integer")}


def json_field_equals(column: Any, field: str, value: str | int | float | bool, dialect: str) -> ColumnElement[bool]:
    """``column[field] == value`` with JSON's types: containment on PostgreSQL (JSONB ``@>``),
    ``json_type`` and ``json_extract`` on SQLite."""
    if dialect == "postgresql":
        return type_coerce(column, JSONB).contains({field: value})
    path = literal('$."' + field + '"')
    kind = func.json_type(column, path)
    if isinstance(value, bool):
        return kind == ("true" if value else "false")
    types = JSON_TYPES_SQLITE.get(type(value), ("text",))
    return and_(kind.in_(types), func.json_extract(column, path) == value)


def listing(table: Table, query: PipelineQuery, dialect: str) -> tuple[Select[Any], Select[Any] | None]:
    """The page's statement and, when ``query.count``, the statement counting every match.
    With an attributes filter, the first attribute drives: its range of the attribute index
    is walked newest first (its rows carry the pipeline's ``created_at``), the pipelines
    fetched by key, the other attributes probed by key."""
    c = table.c
    where: list[ColumnElement[bool]] = []
    for name in ("status", "name", "version", "uuid", "key"):
        value = getattr(query, name)
        if value is not None:
            where.append(c[name] == value)
    if query.state is not None and query.now is not None:
        where += state_conditions(table, query.state, query.now, query.holds or substates.NO_HOLDS, dialect)
    if query.tenant is not None:
        where.append(json_field_equals(c.context, "tenant", query.tenant, dialect))
    if query.param is not None:
        where.append(json_field_equals(c.params, query.param[0], query.param[1], dialect))
    source, created, uuid_column, more = attribute_source(table, query.attributes)
    where += more
    for column, since, until in (
        (created, query.created_since, query.created_until),
        (c.updated_at, query.updated_since, query.updated_until),
    ):
        if since is not None:
            where.append(column >= since)
        if until is not None:
            where.append(column < until)
    count = select(func.count()).select_from(source).where(*where) if query.count else None
    if query.after is not None:
        after_created, after_uuid = query.after
        if after_created is None:  # a prorch 1.0.1 record without created_at: those sort last
            where.append(and_(created.is_(None), uuid_column < after_uuid))
        else:
            where.append(
                or_(
                    created < after_created,
                    and_(created == after_created, uuid_column < after_uuid),
                    created.is_(None),
                )
            )
    page = (
        select(table)
        .select_from(source)
        .where(*where)
        .order_by(created.desc().nulls_last(), uuid_column.desc())
        .limit(query.limit)
    )
    return page, count


def attribute_source(
    table: Table, wanted: dict[str, str] | None
) -> tuple[Any, ColumnElement[Any], ColumnElement[Any], list[ColumnElement[bool]]]:
    """What a listing reads from, its (created_at, uuid) order, and the conditions of the
    attributes after the first: the pipelines table alone without attributes; else joined to
    the first attribute's rows, whose (name, value, created_at, uuid) index gives the order
    (a rare attribute costs its matches, a common one a page), the others probed by key."""
    c = table.c
    if not wanted:
        return table, c.created_at, c.uuid, []
    (name, value), *rest = wanted.items()
    first = pipeline_attributes.alias("attribute")
    joined = table.join(first, and_(first.c.pipeline_uuid == c.uuid, first.c.name == name, first.c.value == value))
    a = pipeline_attributes.c
    more: list[ColumnElement[bool]] = [
        exists().where(a.pipeline_uuid == c.uuid, a.name == other, a.value == wanted_value)
        for other, wanted_value in rest
    ]
    return joined, first.c.created_at, first.c.pipeline_uuid, more


def state_conditions(
    table: Table, state: str, now: datetime, holds: substates.Holds, dialect: str
) -> list[ColumnElement[bool]]:
    """``prorch.model.substates.state_of`` as conditions on the pipeline row: the pauses from
    their table (as the claim reads them), the classes held by their limits from ``holds``."""
    c = table.c
    if state not in substates.SUBSTATES:
        return [c.status == state]
    leased = and_(c.lease_expires_at.is_not(None), c.lease_expires_at > now)
    if state == substates.RUNNING:
        return [c.status == "pending", leased]
    free = not_paused(table, dialect)
    if state == substates.PAUSED:
        return [c.status == "pending", not_(leased), not_(free)]
    came = or_(c.next_run_at.is_(None), c.next_run_at <= now)
    if state == substates.WAITING:
        return [c.status == "pending", not_(leased), free, not_(came)]
    if state in substates.LIMITED:
        return [c.status == "pending", not_(leased), free, came, c.name.in_(holds.names_in(state))]
    held = sorted(holds.limited)
    return [c.status == "pending", not_(leased), free, came, *([c.name.not_in(held)] if held else [])]


def stats(table: Table, connection: Connection, now: datetime, ended_since: datetime) -> PipelineStats:
    """The overview's counts, each from an index: (status, name, version) groups from a covering
    index, running and due pipelines from the due index, the last hour from the partial index
    of ended pipelines."""
    c = table.c
    counts = group_counts(table, connection)
    # running = leased among the due ones: a worker claims only due pipelines, so this reads the
    # due index's range, not every pending row (a million waiting ones cost nothing here)
    leased = c.lease_expires_at > now
    free = or_(c.lease_expires_at.is_(None), ~leased)
    pending = connection.execute(
        select(
            func.count().filter(leased),
            func.count().filter(free),
            func.min(c.next_run_at).filter(free),  # waiting for a worker: a running one is not late
        ).where(c.status == "pending", c.next_run_at <= now)
    ).one()
    crashed = json_field_equals(c.last_error, "type", "WorkerCrashed", connection.dialect.name)
    quarantined = connection.execute(select(func.count()).where(c.status == "failed", crashed)).scalar_one()
    ended = connection.execute(ended_query(table, connection.dialect.name), {"since": ended_since}).all()
    return PipelineStats(
        counts=counts,
        running=int(pending[0] or 0),
        due=int(pending[1] or 0),
        quarantined=int(quarantined or 0),
        oldest_due=to_utc(pending[2]) if pending[2] is not None else None,
        ended=[(str(status), to_utc(at)) for status, at in ended if at is not None],
    )


def group_counts(table: Table, connection: Connection) -> list[GroupCount]:
    """Pipelines by (status, name, version), in that order, from the covering index. On SQLite
    the largest group is not walked when a sample of the table names it: it is the table's
    ``count(*)`` (which SQLite answers from its pages' cell counts, not entry by entry) minus the
    other groups, counted in the index's ranges around it, all in one statement (one snapshot).
    Over a million pipelines in one group: a fifth of the GROUP BY's CPU (docs/benchmarks.md)."""
    if connection.dialect.name == "sqlite":
        largest = largest_group(table, connection)
        if largest is not None:
            return counts_around(table, connection, largest)
    c = table.c
    rows = connection.execute(select(c.status, c.name, c.version, func.count()).group_by(c.status, c.name, c.version))
    return sorted((str(s), str(n), int(v), int(k)) for s, n, v, k in rows)


def largest_group(table: Table, connection: Connection) -> tuple[str, str, int] | None:
    """The (status, name, version) of most of ``SAMPLES`` pipelines read at points spread over
    the uuid range (uuids are random: a sample of the table), if it holds a quarter of them;
    None otherwise (no group is large enough for leaving it out to pay for the total count)."""
    found = Counter((str(s), str(n), int(v)) for s, n, v in connection.execute(sample_statement(table)))
    if not found:
        return None
    group, seen = found.most_common(1)[0]
    return group if seen >= SAMPLES // 4 else None


def counts_around(table: Table, connection: Connection, largest: tuple[str, str, int]) -> list[GroupCount]:
    """Pipelines by (status, name, version): the groups in the index's ranges before and after
    ``largest`` grouped, and ``largest`` as the total minus theirs (left out when none is left)."""
    status, name, version = largest
    rows = connection.execute(around_statement(table), {"status": status, "name": name, "version": version})
    others: list[GroupCount] = []
    everything = 0
    for s, n, v, k in rows:
        if s is None:  # the total's row (status is never NULL)
            everything = int(k)
        else:
            others.append((str(s), str(n), int(v), int(k)))
    left = everything - sum(k for *_, k in others)
    return sorted(others + ([(status, name, version, left)] if left > 0 else []))


@functools.cache
def sample_statement(table: Table) -> CompoundSelect[Any]:
    """(status, name, version) of the first pipeline at or after each of ``SAMPLES`` points
    spread over the uuid range: a seek of the primary key each (built once per table)."""
    c = table.c
    points = [
        select(c.status, c.name, c.version).where(c.uuid >= f"{i * 256 // SAMPLES:02x}").order_by(c.uuid).limit(1)
        for i in range(SAMPLES)
    ]
    return union_all(*(select(point.subquery()) for point in points))


@functools.cache
def around_statement(table: Table) -> CompoundSelect[Any]:
    """The groups in the six ranges of the (status, name, version) index before and after the
    group ``:status, :name, :version``, and the table's ``count(*)`` as a row of NULLs and the
    total (on SQLite from page cell counts: a whole table's count, alone in its subquery)."""
    c = table.c
    columns = (c.status, c.name, c.version)
    status, name = bindparam("status", type_=c.status.type), bindparam("name", type_=c.name.type)
    version = bindparam("version", type_=c.version.type)
    ranges = [
        c.status < status,
        and_(c.status == status, c.name < name),
        and_(c.status == status, c.name == name, c.version < version),
        and_(c.status == status, c.name == name, c.version > version),
        and_(c.status == status, c.name > name),
        c.status > status,
    ]
    total = select(func.count()).select_from(table).scalar_subquery()
    return union_all(
        *(select(*columns, func.count()).where(part).group_by(*columns) for part in ranges),
        select(null(), null(), null(), total),
    )


def version_groups(table: Table, connection: Connection) -> list[VersionGroup]:
    """Pipelines counted by (name, version, status, recorded patches) in one GROUP BY, with each
    group's earliest ``created_at``; statuses are then folded into live and ended here (five at
    most, so the statement groups by plain columns and the patches' JSON text)."""
    c = table.c
    if connection.dialect.name == "postgresql":
        patches = func.jsonb_extract_path_text(c["metadata"], "patches")
    else:
        patches = func.json_extract(c["metadata"], "$.patches")
    statement = select(c.name, c.version, c.status, patches, func.count(), func.min(c.created_at)).group_by(
        text("1, 2, 3, 4")  # by position: the patches' expression is bound once
    )
    groups: dict[tuple[str, int, tuple[str, ...], bool], tuple[int, datetime | None]] = {}
    for name, version, status, recorded, count, oldest in connection.execute(statement):
        ids = tuple(sorted(str(i) for i in json.loads(recorded))) if recorded else ()
        key = (str(name), int(version), ids, status in ENDED_STATUSES)
        total, earliest = groups.get(key, (0, None))
        moment = to_utc(oldest) if oldest is not None else None
        if moment is not None and (earliest is None or moment < earliest):
            earliest = moment
        groups[key] = (total + int(count), earliest)
    return [VersionGroup(*key, count, oldest) for key, (count, oldest) in groups.items()]


def ended_query(table: Table, dialect: str) -> Any:
    """Pipelines ended since ``:since``, read from the partial index of ended pipelines. SQLite's
    planner, without statistics, prefers the (status, created_at) index, which reads every
    finished pipeline; ``INDEXED BY`` names the right one. On PostgreSQL the index is on
    ``ended_at`` (``schema.ENDED_AT``: ``updated_at`` once ended, so the same rows)."""
    c = table.c
    if dialect == "postgresql":
        sql = f"SELECT status, updated_at FROM {table.name} WHERE {ENDED_AT} >= :since"
    elif dialect == "sqlite":
        sql = (
            f"SELECT status, updated_at FROM {table.name} INDEXED BY ix_pipelines_ended "
            f"WHERE {ENDED.text} AND updated_at >= :since"
        )
    else:
        return select(c.status, c.updated_at).where(ENDED, c.updated_at >= bindparam("since", type_=c.updated_at.type))
    return text(sql).bindparams(bindparam("since", type_=c.updated_at.type)).columns(c.status, c.updated_at)


def ended_before(table: Table, dialect: str) -> Any:
    """Uuids of ended pipelines with a status in ``:statuses`` and ``updated_at`` before
    ``:before`` whose parent is not stored, at most ``:limit``, from the partial index of ended
    pipelines (retention)."""
    c = table.c
    before = bindparam("before", type_=c.updated_at.type)
    statuses: Any = bindparam("statuses", expanding=True)
    limit = bindparam("limit", type_=Integer())
    if dialect == "postgresql":  # by the index on ended_at; for an ended pipeline it is updated_at
        sql = (
            f"SELECT uuid FROM {table.name} WHERE {ENDED_AT} < :before AND status IN :statuses "
            f"AND {_ORPHAN.format(t=table.name)} LIMIT :limit"
        )
    elif dialect == "sqlite":
        sql = (
            f"SELECT uuid FROM {table.name} INDEXED BY ix_pipelines_ended "
            f"WHERE {ENDED.text} AND status IN :statuses AND updated_at < :before AND {_ORPHAN.format(t=table.name)} "
            "LIMIT :limit"
        )
    else:
        return select(c.uuid).where(*purgeable(table, statuses, before)).limit(limit)
    return text(sql).bindparams(before, statuses, limit)


_ORPHAN = "(parent_uuid IS NULL OR NOT EXISTS (SELECT 1 FROM {t} AS parent WHERE parent.uuid = {t}.parent_uuid))"


def purgeable(table: Table, statuses: Any, before: Any) -> list[Any]:
    """Retention's rule as conditions: ended with one of ``statuses``, last changed before
    ``before``, and no stored parent (a parent's ``child_result`` reads its children)."""
    c = table.c
    parent = table.alias("parent")
    orphan = c.parent_uuid.is_(None) | ~exists().where(parent.c.uuid == c.parent_uuid)
    return [ENDED, c.status.in_(statuses), c.updated_at < before, orphan]
