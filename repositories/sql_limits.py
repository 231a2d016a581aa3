"""The claim of one limited pipeline name as SQL (``max_running``, ``max_running_per_tenant``,
``max_running_per_key``, ``rate_limit``, ``fair``: ``prorch.model.limit_rules``). It runs in the
claim's transaction, which holds the name's lock (``SQLBackend.lock_name``: SQLite's write lock,
a PostgreSQL advisory lock) until it commits, so counting and claiming are one step for every
worker: ``choose`` counts the name's live leases (per group when it must) and its claims within
the rate's period and picks what the limits leave room for; the claim takes those that have a
place in the one claim order (``repositories.sql_claim``), and ``lease`` leases them and stores
one start per claim of a rate-limited name. Per
tenant and per key are one path (a grouping each: the tenant in the context's JSON, the stored
``concurrency_key`` column), and so is a fair claim, which takes the groups' due pipelines in
turns."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    FromClause,
    Integer,
    Select,
    Table,
    bindparam,
    delete,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB

from prorch.model.due import row_claim_order
from prorch.model.limit_rules import KEY, TENANT, ClaimLimit, GroupValue, Tally, TenantKey, fair_order, within_limits
from prorch.model.status import Status
from repositories.schema import pipeline_leases, rate_limit_starts
from repositories.sql_listing import json_field_equals

FEW_KEYS = 32
"""A per-key claim reads key by key up to this many keys with pending pipelines, else walks
the name's due pipelines in claim order leaving the full keys out (one query, but it reads past
a full key's backlog)."""
ALL_KEYS = 1_000_000  # a fair claim reads every key: its turns need them all

SCALAR_TYPES = {"postgresql": ("string", "number", "boolean"), "sqlite": ("text", "integer", "real", "true", "false")}


class LimitedClaim:
    """The statements of a limited claim on one pipelines table, built once."""

    def __init__(
        self, table: Table, dialect: str, due: Select[Any], lockable: Callable[[Select[Any]], Select[Any]],
        lease_values: dict[str, Any], by_lease_table: Callable[[Connection, str], bool],
    ) -> None:  # fmt: skip
        """``due``: the due query of the table (uuids in claim order; bound: _now, _limit);
        ``lockable``: it as a claim's subquery (``SQLRepository.lockable``); ``by_lease_table``:
        whether a name's leases are counted from ``pipeline_leases`` (``SQLRepository``'s)."""
        c, starts = table.c, rate_limit_starts.c
        self.table, self.dialect, self.lease_values = table, dialect, lease_values
        self.by_lease_table = by_lease_table
        self.due = due.where(c.name == bindparam("_name"))
        self.running, self.leased = live_lease_queries(table, by_lease_table=False)
        # PostgreSQL: from pipeline_leases once the name is ready there (repositories.postgresql_leases)
        self.running_by_table, self.leased_by_table = live_lease_queries(table, by_lease_table=True)
        self.lockable = lockable
        self.lease_chosen = (
            update(table).where(c.uuid.in_(bindparam("_uuids", expanding=True)), *self._still_due())
            .values(lease_values).returning(*table.columns)
        )  # fmt: skip
        since = bindparam("_since", type_=starts.started_at.type)
        self.prune = delete(rate_limit_starts).where(starts.name == bindparam("_name"), starts.started_at <= since)
        self.started = select(func.count()).where(starts.name == bindparam("_name"))
        self.record = insert(rate_limit_starts)
        grouped = (c.name, c.context, c.concurrency_key, c.priority, c.next_run_at)
        self.heads = self.due.add_columns(*grouped)  # the first due ones of the name, in claim order
        self.group_heads = self.heads.where(c.concurrency_key == bindparam("_group"))  # of one key
        # as a claim reads them: on PostgreSQL, locked, skipping those another claim holds
        self.locked_heads, self.locked_group_heads = lockable(self.heads), lockable(self.group_heads)
        self.pending_groups = pending_keys(table)

    def due_before(self, connection: Connection, name: str, params: dict[str, Any], last: tuple[Any, ...]) -> bool:
        """Whether the name's first due pipeline comes before ``last`` in claim order: whether
        it can have a place in a claim whose unlimited names fill the batch up to ``last``
        (read without its lock: one step of its claim index)."""
        first = connection.execute(self.heads, {**params, "_name": name, "_limit": 1}).mappings().first()
        return first is not None and row_claim_order(first) < last

    def choose(
        self, connection: Connection, name: str, limits: dict[str, ClaimLimit], params: dict[str, Any], most: int,
        rotation: int = 0,
    ) -> list[tuple[Any, str]]:  # fmt: skip
        """Up to ``most`` due pipelines of ``name`` that its limits let a claim take now, as
        (row, uuid) in the order it takes them (claim order; a fair name's turns, from the
        claim's ``rotation``, each with the row whose place in the claim order it takes), not
        leased yet: the caller holds the name's lock until it has leased those it keeps (``lease``)."""
        limit = limits[name]
        tally = Tally(limits)
        bound = {"_name": name, "_now": params["_now"]}
        if limit.rate is not None:
            connection.execute(self.prune, {"_name": name, "_since": params["_now"] - limit.rate.period})
            tally.started[name] = connection.execute(self.started, {"_name": name}).scalar_one()
        if limit.groupings():
            leased = self.leased_by_table if self.by_lease_table(connection, name) else self.leased
            tally.add_leased(row._mapping for row in connection.execute(leased, bound))
        elif limit.max_running is not None:
            running = self.running_by_table if self.by_lease_table(connection, name) else self.running
            tally.running[name] = connection.execute(running, bound).scalar_one()
        room = tally.room(name)
        room = most if room is None else min(room, most)
        if room <= 0:
            return []
        return self._choose_within(connection, name, tally, params, room, rotation)

    def lease(
        self, connection: Connection, uuids: list[str], params: dict[str, Any],
        name: str | None = None, limit: ClaimLimit | None = None,
    ) -> list[Any]:  # fmt: skip
        """Lease the chosen pipelines that are still due (another process's ``claim_one`` may
        have taken one since), of the limited ``name`` with ``limit`` (or of unlimited names),
        and store one start per claim of a rate-limited name; their rows as leased, in the
        order chosen (RETURNING gives no order of its own)."""
        rows = list(connection.execute(self.lease_chosen, {**params, "_uuids": uuids}).mappings())
        if limit is not None and limit.rate is not None and rows:
            connection.execute(
                self.record, [{"name": name, "started_at": params["_now"], "pipeline_uuid": r["uuid"]} for r in rows]
            )
        place = {uuid: index for index, uuid in enumerate(uuids)}
        return sorted(rows, key=lambda row: place[row["uuid"]])

    def _choose_within(
        self, connection: Connection, name: str, tally: Tally, params: dict[str, Any], room: int, rotation: int
    ) -> list[tuple[Any, str]]:
        """Up to ``room`` of the name's due pipelines within its per-group limits and turns."""
        limit = tally.limits[name]
        rows = None
        if limit.fair is not None:
            rows = self._choose_by_keys(connection, name, tally, params, (room, ALL_KEYS, rotation))
        elif limit.per_key is not None and limit.per_tenant is None:
            rows = self._choose_by_keys(connection, name, tally, params, (room, FEW_KEYS, rotation))
        if rows is not None:
            return rows
        if limit.groupings():
            return self._choose_by_group(connection, name, tally, params, room)
        found = connection.execute(self.locked_heads, {**params, "_name": name, "_limit": room}).mappings()
        return [(row, row["uuid"]) for row in found]

    def _choose_by_group(
        self, connection: Connection, name: str, tally: Tally, params: dict[str, Any], room: int
    ) -> list[tuple[Any, str]]:
        """Candidates of the groups (tenants, keys) not yet full, a window at a time: each window
        fills at least one more group, or the room, or is the last one, so a group with many
        due pipelines never hides the others behind it. A window leaves out the ones chosen
        before it (nothing is leased until the claim has chosen)."""
        limit = tally.limits[name]
        chosen: list[tuple[Any, str]] = []
        while room > 0:
            full = [self._not_in(by, group) for by, _ in limit.groupings() for group in tally.full_groups(name, by)]
            window = self.lockable(
                self.heads.where(*full, self.table.c.uuid.not_in(bindparam("_chosen", expanding=True)))
            )
            bound = {**params, "_name": name, "_limit": room, "_chosen": [uuid for _, uuid in chosen]}
            found = connection.execute(window, bound).mappings().all()
            more = within_limits([(row, (row, row["uuid"])) for row in found], tally, room)
            chosen += more
            if len(found) < room or not more:
                break  # the last window: no more candidates
            room -= len(more)
        return chosen

    def _choose_by_keys(
        self, connection: Connection, name: str, tally: Tally, params: dict[str, Any], bounds: tuple[int, int, int]
    ) -> list[tuple[Any, str]] | None:
        """The name's due pipelines read key by key: the keys with pending pipelines (a skip
        over the keyed index, one step per key), the first due ones of each key not yet full in
        claim order, as many as it may take (its room under ``max_running_per_key``, and for a
        fair name its share of the room and one more), and the first due ones of the name (those
        stored without a key among them); then ``fair_order`` (a fair name: keys in turn) and
        ``within_limits`` as every backend. O(keys x room), however long one key's backlog;
        None when more than ``most_keys`` keys have pending pipelines (the caller walks).
        ``bounds``: (room, most_keys, the claim's rotation of turns)."""
        room, most_keys, rotation = bounds
        limit = tally.limits[name]
        full = set(tally.full_groups(name, KEY))
        found_keys = connection.execute(self.pending_groups, {"_name": name, "_keys": most_keys + 1}).scalars().all()
        if len(found_keys) > most_keys:
            return None
        keys = [key for key in found_keys if key not in full]
        bound = {**params, "_name": name}
        heads = connection.execute(self.locked_heads, {**bound, "_limit": room}).mappings()
        found = {row["uuid"]: row for row in heads}
        for key in keys:
            share = self._share(limit, tally, name, key, keys, room)
            of_key = connection.execute(self.locked_group_heads, {**bound, "_group": key, "_limit": share}).mappings()
            found.update((row["uuid"], row) for row in of_key)
        due = [(row, (row, row["uuid"])) for row in sorted(found.values(), key=row_claim_order)]
        # each one taken holds the place (the claim order) of the candidate whose place its turn
        # fills: a fair name's turns hold the places of its first due ones in the one claim order
        # (``merge_in_claim_order``), not their own later ones, which younger pipelines of other
        # names would take
        ordered = fair_order(due, {name: limit}, rotation)
        placed = [(row, (due[place][0], uuid)) for place, (row, (_, uuid)) in enumerate(ordered)]
        return within_limits(placed, tally, room)

    @staticmethod
    def _share(limit: ClaimLimit, tally: Tally, name: str, key: str, keys: list[str], room: int) -> int:
        """How many of a key's first due pipelines the claim may take: enough for its turns
        (fair) and no more than its room under the per-key limit."""
        share = room
        if limit.fair is not None:
            total = sum(limit.fair.weight(other) for other in keys)
            share = min(share, math.ceil(room * limit.fair.weight(key) / total) + 1)
        if limit.per_key is not None:
            share = min(share, limit.per_key - tally.groups[(name, KEY, key)])
        return max(share, 0)

    def _not_in(self, by: str, group: GroupValue) -> ColumnElement[bool]:
        """Pipelines not of this group (tenant or key; None: the group of none)."""
        if by == TENANT:
            return self._not_of(group)
        key = self.table.c.concurrency_key
        other: ColumnElement[bool] = key.is_not(None) if group is None else or_(key.is_(None), key != group)
        return other

    def _still_due(self) -> tuple[ColumnElement[bool], ...]:
        """Due as the claim read it (another process's ``claim_one`` may have taken one since)."""
        c = self.table.c
        now = bindparam("_now", type_=c.lease_expires_at.type)
        return (c.status == Status.PENDING.value, or_(c.lease_expires_at.is_(None), c.lease_expires_at <= now))

    def _not_of(self, tenant: TenantKey) -> ColumnElement[bool]:
        """Pipelines not of this tenant (for None: those with a scalar tenant). Spelled out so
        that a pipeline without a tenant is not of a named one: ``NOT (NULL AND ...)`` is NULL."""
        untenanted = self._without_tenant()
        if tenant is None:
            return not_(untenanted)
        return or_(untenanted, not_(json_field_equals(self.table.c.context, "tenant", tenant[1], self.dialect)))

    def _without_tenant(self) -> ColumnElement[bool]:
        """Pipelines without a scalar tenant: one group for ``max_running_per_tenant``."""
        context = self.table.c.context
        if self.dialect == "postgresql":
            kind = func.jsonb_typeof(type_coerce(context, JSONB)["tenant"])
        else:
            kind = func.json_type(context, literal('$."tenant"'))
        return or_(kind.is_(None), kind.not_in(SCALAR_TYPES.get(self.dialect, SCALAR_TYPES["sqlite"])))


def live_lease_queries(table: Table, *, by_lease_table: bool) -> tuple[Select[Any], Select[Any]]:
    """A name's live leases, counted and as rows for the groups (bound: _name, _now): only the
    leased rows, their status and expiry checked on the pipeline row. From the pipelines (by
    ``ix_pipelines_leased`` on SQLite, by the name's claim index on PostgreSQL, which has no
    index of leases on the table: migration 0023), or from ``pipeline_leases`` by name, each
    joined to its pipeline."""
    c = table.c
    now = bindparam("_now", type_=c.lease_expires_at.type)
    live = (c.lease_owner.is_not(None), c.status == Status.PENDING.value, c.lease_expires_at > now)
    source: FromClause = table
    of_name = c.name == bindparam("_name")
    if by_lease_table:
        leases = pipeline_leases.c
        source, of_name = pipeline_leases.join(table, c.uuid == leases.pipeline_uuid), leases.name == bindparam("_name")
    running = select(func.count()).select_from(source).where(of_name, *live)
    leased = select(c.name, c.context, c.concurrency_key).select_from(source).where(of_name, *live)
    return running, leased


def pending_keys(table: Table) -> Any:
    """The distinct stored keys of one name's pending pipelines (bound: _name), ascending, read
    as a skip over ``ix_pipelines_concurrency_key``: one index step per key, however many
    pipelines each key holds (a loose index scan, written as a recursive CTE)."""
    c = table.c
    pending = (c.name == bindparam("_name"), c.status == Status.PENDING.value)
    first = select(c.concurrency_key).where(*pending, c.concurrency_key.is_not(None))
    first = first.order_by(c.concurrency_key).limit(1)
    keys = select(first.scalar_subquery().label("key")).cte("keys", recursive=True)
    after = select(c.concurrency_key).where(*pending, c.concurrency_key > keys.c.key).order_by(c.concurrency_key)
    keys = keys.union_all(select(after.limit(1).scalar_subquery()).where(keys.c.key.is_not(None)))
    return select(keys.c.key).where(keys.c.key.is_not(None)).limit(bindparam("_keys", type_=Integer()))
