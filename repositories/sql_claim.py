"""The claim of the SQL backend: due pipelines leased in one statement (within the limits of
pipeline names, ``repositories.sql_limits``), one pipeline leased for an in-process run, a lease
renewed. A part of ``SQLRepository`` (``repositories.sql``); each statement is built once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, ClassVar, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Integer,
    Select,
    Table,
    and_,
    bindparam,
    case,
    false,
    func,
    or_,
    select,
    true,
    tuple_,
    update,
)

from prorch.model.due import (
    CLAIM_ORDER,
    TERMINAL_VALUES,
    ClaimRequest,
    Runnable,
    merge_in_claim_order,
    row_claim_order,
)
from prorch.model.limit_rules import next_rotation
from prorch.model.records import JSONDict
from prorch.model.status import Status
from prorch.storage.backend import RenewalsPending
from prorch.storage.repository import ClaimsByRequest
from repositories.sql_connections import SQLConnections
from repositories.sql_limits import LimitedClaim
from repositories.sql_pauses import not_paused

__all__ = ["SQLClaims", "claim_kind"]

T = TypeVar("T")
RENEW_CHUNK = 500
"""Leases per statement of ``renew_leases``: three bound values each, far below every driver's limit."""

LEVEL, *IN_LEVEL = CLAIM_ORDER
assert LEVEL == ("priority", True), "a claim by levels walks the priorities highest first"
FEW_LEVELS = 64
"""A claim by levels (``SQLClaims.by_levels``) with more pending priorities than this walks them
all in one statement instead (one probe a level would cost more than the sort it saves)."""


def claim_kind(kind: str, mark: bool) -> str:
    """A claim statement's cache key: one that marks hooks is another statement."""
    return f"{kind}_marked" if mark else kind


class SQLClaims(ClaimsByRequest):
    """The claim and lease statements of the pipelines' table (``SQLRepository`` is one)."""

    table: Table
    backend: SQLConnections
    _searches: dict[str, Any]
    _claims: dict[tuple[str, Runnable | None], Any]
    by_levels: ClassVar[bool] = False
    """SQLite: claim one priority level at a time (``_walk``). prorch never runs ANALYZE,
    and without statistics SQLite planned the one walk in claim order on ``ix_pipelines_due``
    and sorted every due row (O(backlog) a claim); with ``priority = ?`` the walk is a range of
    ``ix_pipelines_claim`` up to ``next_run_at <= now``: the rows it takes, whatever the backlog
    of due or waiting pipelines. PostgreSQL plans the one walk from its statistics (autovacuum
    analyzes)."""

    def _to_record(self, row: Any) -> JSONDict:  # pragma: no cover - SQLRepository's
        raise NotImplementedError

    def _due_query(self, runnable: Runnable | None = None, *, level: bool = False, named: bool = False) -> Select[Any]:
        """Due pipeline uuids in claim order; bound: _now, _limit. With ``runnable``, only
        pipelines of those (name, version) pairs. SQLite and PostgreSQL walk an index in claim
        order (``ix_pipelines_claim``, or ``ix_pipelines_claim_name`` for one name) and stop at
        the limit: a claim reads the rows it takes (and the leased or not-runnable ones among
        them, and a higher priority's future ones), not every due row; no sort. With ``level``,
        those of one priority (bound: _priority), a range of that index (``by_levels``). With
        ``named`` (a limited name's statements add ``name = :_name``), on SQLite the time term
        is kept off the due index (``coalesce``), which a store never analyzed would take and
        sort every due row of every name by: the walk of ``ix_pipelines_claim_name`` is left."""
        c = self.table.c
        now = bindparam("_now", type_=c.next_run_at.type)
        due_at: ColumnElement[Any] = c.next_run_at
        if named and self.by_levels:
            due_at = func.coalesce(c.next_run_at, c.next_run_at)
        order = IN_LEVEL if level else CLAIM_ORDER
        query = (
            select(c.uuid)
            .where(
                c.status == Status.PENDING.value,
                due_at <= now,
                (c.lease_expires_at.is_(None)) | (c.lease_expires_at <= now),
                not_paused(self.table, self.backend.engine.dialect.name),
            )
            .order_by(*(c[field].desc() if descending else c[field].asc() for field, descending in order))
            .limit(bindparam("_limit", type_=Integer()))
        )
        if level:
            query = query.where(c[LEVEL[0]] == bindparam("_priority", type_=Integer()))
        return query if runnable is None else query.where(self._of_classes(runnable))

    def _levels(self, connection: Connection) -> list[int]:
        """The pending pipelines' priorities, highest first (up to ``FEW_LEVELS`` + 1), read
        without reading the pending rows: a dialect with ``by_levels`` gives them."""
        raise NotImplementedError

    def _walk(self, connection: Connection, run: Callable[[dict[str, Any] | None], list[Any]], limit: int) -> list[Any]:
        """Up to ``limit`` rows of a claim statement: ``run`` once with None (the one walk of
        every level), or, where the dialect claims ``by_levels``, once per pending priority,
        highest first, with its level's values (the one walk again past ``FEW_LEVELS``)."""
        if not self.by_levels:
            return run(None)
        levels = self._levels(connection)
        if len(levels) > FEW_LEVELS:
            return run(None)
        rows: list[Any] = []
        for level in levels:
            if len(rows) >= limit:
                break
            rows += run({"_priority": level, "_limit": limit - len(rows)})
        return rows

    def _of_classes(self, runnable: Runnable) -> ColumnElement[bool]:
        """``(name = a AND version IN (1, 2)) OR (name = b AND ...)``, one term per name: a
        plain boolean every database plans well, on the due index or on (status, name, version).
        The values are bound into the statement, built once: a worker's classes do not change."""
        c = self.table.c
        versions: dict[str, list[int]] = {}
        for name, version in sorted(runnable):
            versions.setdefault(name, []).append(version)
        if not versions:
            return false()
        return or_(*(and_(c.name == name, c.version.in_(found)) for name, found in versions.items()))

    def _statement(self, kind: str, runnable: Runnable | None, build: Callable[[], T]) -> T:
        """A claim statement for these classes, built once (a few kept: a worker has one set)."""
        key = (kind, runnable)
        found = self._claims.get(key)
        if found is None:
            if len(self._claims) >= 16:
                self._claims.clear()
            found = self._claims[key] = build()
        return cast(T, found)

    def search_due(self, now: datetime, limit: int) -> list[JSONDict]:
        """Due pipelines in claim order, unleased; by levels where the claim is (``by_levels``):
        the one walk, on a SQLite store never analyzed, sorted every due row each call."""
        query, level_query = self._search("_due", level=False), self._search("_due_level", level=True)
        with self.backend.connect(write=False) as connection:

            def run(level: dict[str, Any] | None) -> list[Any]:
                if level is None:  # every level in one walk
                    return list(connection.execute(query, {"_now": now, "_limit": limit}).mappings())
                return list(connection.execute(level_query, {"_now": now, **level}).mappings())

            rows = self._walk(connection, run, limit) if limit > 0 else run(None)
        return self._by_priority([self._to_record(row) for row in rows])

    def _search(self, key: str, *, level: bool) -> Any:
        """``search_due``'s statement (of one priority level with ``level``), built once."""
        query = self._searches.get(key)
        if query is None:
            due = self._due_query(level=level).subquery()
            query = self._searches[key] = select(self.table).where(self.table.c.uuid.in_(select(due.c.uuid)))
        return query

    def claim(self, request: ClaimRequest) -> list[JSONDict]:
        """Lease due pipelines in one statement; ``_claim_limited`` when the request has limits."""
        if request.limits:
            return self._claim_limited(request)
        runnable, mark = request.runnable, request.mark
        query = self._statement(claim_kind("claim", mark), runnable, lambda: self._claim_query(runnable, mark))
        params = {**self._claim_params(request), "_limit": request.limit}
        with self.backend.connect(write=True) as connection:
            rows = connection.execute(query, params).mappings().all()
        return self._by_priority([self._to_record(row) for row in rows])

    def _claim_query(self, runnable: Runnable | None, mark: bool, *, level: bool = False) -> Any:
        """The unlimited claim: lease the due rows of ``runnable`` in claim order and return
        them whole; bound: _now, _owner, _until, _limit (and _priority with ``level``)."""
        return (
            update(self.table)
            .where(self.table.c.uuid.in_(self.lockable(self._due_query(runnable, level=level)).scalar_subquery()))
            .values(self._lease_values(mark=mark))
            .returning(*self.table.columns)
        )

    def _claim_limited(self, request: ClaimRequest) -> list[JSONDict]:
        """The claim within the limits of pipeline names (``prorch.model.limit_rules``), in the
        one claim order across limited and unlimited names, in one transaction: the first due
        ones of the unlimited names (a walk of the claim index, up to the batch), then, under
        its lock, what each limited name may take (``sql_limits.LimitedClaim.choose``) when its
        first due one comes before the last of those; the first of them all in claim order
        (``merge_in_claim_order``) are leased. O(batch x limited names), however long the
        backlog: a limited class waits behind the unlimited ones only where the order says so."""
        limit, limits, runnable = request.limit, request.limits, request.runnable
        params = self._claim_params(request)
        free, free_level, limited = self._limited_statements(runnable, request.mark)
        names = sorted(limits) if runnable is None else sorted({name for name, _ in runnable} & limits.keys())
        rotation = next_rotation() if any(rule.fair is not None for rule in limits.values()) else 0
        with self.backend.connect(write=True) as connection:
            unlimited: list[Any] = []
            if runnable is None or not {name for name, _ in runnable} <= limits.keys():
                # (none when every class it runs is limited: the walk would read their due rows for nothing)
                bound = {**params, "_limit": limit, "_limited": sorted(limits)}

                def walk(level: dict[str, Any] | None) -> list[Any]:
                    if level is None:  # every level in one walk
                        return list(connection.execute(free, bound).mappings())
                    return list(connection.execute(free_level, {**bound, **level}).mappings())

                unlimited = self._walk(connection, walk, limit)
            last = row_claim_order(unlimited[-1]) if len(unlimited) >= limit else None
            sources: list[list[tuple[Any, str]]] = [[(row, row["uuid"]) for row in unlimited]]
            for name in names:
                if last is not None and not limited.due_before(connection, name, params, last):
                    sources.append([])  # none of it due before the batch is full without it: no lock
                    continue
                self.backend.lock_name(connection, name)
                sources.append(limited.choose(connection, name, limits, params, limit, rotation))
            taken = merge_in_claim_order(sources, limit)
            rows: list[Any] = []
            for index, of in enumerate([None, *names]):
                uuids = [uuid for source, uuid in taken if source == index]
                if uuids:
                    rows += limited.lease(connection, uuids, params, of, limits[of] if of else None)
        place = {uuid: number for number, (_, uuid) in enumerate(taken)}
        return [self._to_record(row) for row in sorted(rows, key=lambda row: place[row["uuid"]])]

    def _limited_statements(self, runnable: Runnable | None, mark: bool) -> tuple[Any, Any, LimitedClaim]:
        """The limited claim's statements for these classes, built once: the walk of the
        unlimited names' due pipelines (bound: _limited, the limited names), the same walk of
        one priority level (``by_levels``), and ``LimitedClaim``."""
        c = self.table.c

        def walk(level: bool) -> Any:
            due = self._due_query(runnable, level=level).add_columns(c.priority, c.next_run_at)
            return self.lockable(due.where(c.name.not_in(bindparam("_limited", expanding=True))))

        free = self._statement(claim_kind("claim_free", mark), runnable, lambda: walk(False))
        free_level = self._statement(claim_kind("claim_free_level", mark), runnable, lambda: walk(True))
        dialect = self.backend.engine.dialect.name
        limited = self._statement(claim_kind("limited", mark), runnable, lambda: LimitedClaim(
            self.table, dialect, self._due_query(runnable, named=True), self.lockable, self._lease_values(mark=mark),
            self.leases_in_table,
        ))  # fmt: skip
        return free, free_level, limited

    @staticmethod
    def _claim_params(request: ClaimRequest) -> dict[str, Any]:
        """The bound values every claim statement shares."""
        return {"_now": request.now, "_owner": request.owner, "_until": request.lease_expires_at}

    def lockable(self, due: Select[Any]) -> Select[Any]:
        """The due query as the claim's subquery: where the database can lock rows, it skips
        the ones another worker's claim holds (PostgreSQL); as it is here."""
        return due

    def leases_in_table(self, connection: Connection, name: str) -> bool:
        """Whether a limited name's live leases are counted from ``pipeline_leases`` (PostgreSQL,
        migration 0023); here not: from the pipelines table, by ``ix_pipelines_leased``."""
        return False

    def claim_one(self, uuid: str, now: datetime, owner: str, lease_expires_at: datetime) -> JSONDict | None:
        c = self.table.c
        query = (
            update(self.table)
            .where(
                c.uuid == uuid,
                c.status.not_in(sorted(TERMINAL_VALUES)),
                (c.lease_expires_at.is_(None)) | (c.lease_expires_at <= now) | (c.lease_owner == owner),
            )
            .values(self._lease_values())
            .returning(*self.table.columns)
        )
        with self.backend.connect(write=True) as connection:
            row = connection.execute(query, {"_owner": owner, "_until": lease_expires_at}).mappings().first()
            if row is None:
                current = connection.execute(select(self.table).where(c.uuid == uuid)).mappings().first()
                if current is None or current["status"] not in TERMINAL_VALUES:
                    return None  # missing, or leased by another owner
                row = current
        return self._to_record(row)

    def renew_lease(self, uuid: str, owner: str, lease_expires_at: datetime) -> bool:
        c = self.table.c
        query = (
            update(self.table).where(c.uuid == uuid, c.lease_owner == owner).values(lease_expires_at=lease_expires_at)
        )
        with self.backend.connect(write=True) as connection:
            return connection.execute(query).rowcount == 1

    def renew_leases(self, leases: Sequence[tuple[str, str]], lease_expires_at: datetime) -> set[str]:
        """One statement per ``RENEW_CHUNK`` leases, in one transaction. A lease whose row
        another transaction held (``renew_chunk``, PostgreSQL) is tried alone after it
        (``renew_busy``); one still held then is pending (``RenewalsPending``, with all renewed)."""
        renewed: set[str] = set()
        busy: list[tuple[str, str]] = []
        with self.backend.connect(write=True) as connection:
            for start in range(0, len(leases), RENEW_CHUNK):
                done, held = self.renew_chunk(connection, leases[start : start + RENEW_CHUNK], lease_expires_at)
                renewed |= done
                busy += held
        if not busy:
            return renewed
        try:
            return renewed | self.renew_busy(busy, lease_expires_at)
        except RenewalsPending as pending:
            pending.renewed |= renewed
            raise

    def renew_busy(self, busy: Sequence[tuple[str, str]], lease_expires_at: datetime) -> set[str]:
        """Renew alone each lease whose row another transaction held during the batch: the
        uuids renewed. Here each waits for its row (``renew_lease``), then compares the token."""
        return {uuid for uuid, owner in busy if self.renew_lease(uuid, owner, lease_expires_at)}

    def renew_chunk(
        self, connection: Connection, leases: Sequence[tuple[str, str]], lease_expires_at: datetime
    ) -> tuple[set[str], list[tuple[str, str]]]:
        """Renew the leases whose token still holds their row: the uuids renewed, and the leases
        left to try alone (none here: SQLite's write lock keeps other writers out meanwhile).
        The uuids' own ``IN`` finds the rows by the primary key: SQLite scans the whole table
        for a row value ``IN`` alone, inside its write lock."""
        c = self.table.c
        query = (
            update(self.table)
            .where(c.uuid.in_([uuid for uuid, _owner in leases]), tuple_(c.uuid, c.lease_owner).in_(leases))
            .values(lease_expires_at=lease_expires_at)
            .returning(c.uuid)
        )
        return set(connection.execute(query).scalars()), []

    def _lease_values(self, *, mark: bool = False) -> JSONDict:
        """What a claim sets; with ``mark``, the hook mark of a row that is no crash suspect
        (``prorch.model.due.marks``; each CASE reads the row as it was before the claim)."""
        c = self.table.c
        values: JSONDict = {
            "lease_owner": bindparam("_owner"),
            "lease_expires_at": bindparam("_until", type_=c.lease_expires_at.type),
            "claims": c.claims + 1,
            "revision": c.revision + 1,
        }
        if mark:
            fresh = and_(c.hook_started_at.is_(None), c.crashes == 0)
            values["hook_started_at"] = case(
                (fresh, bindparam("_now", type_=c.hook_started_at.type)), else_=c.hook_started_at
            )
            values["hook_shared"] = case((fresh, true()), else_=c.hook_shared)
        return values

    @staticmethod
    def _by_priority(records: list[JSONDict]) -> list[JSONDict]:
        return sorted(records, key=row_claim_order)
