"""The claim of one limited pipeline name as SQL (``max_running``, ``max_running_per_tenant``,
``rate_limit``: ``prorch.model.limit_rules``). It runs in a transaction that holds the name's lock
(``SQLBackend.lock_name``: SQLite's write lock, a PostgreSQL advisory lock), so counting and
claiming are one step for every worker: it counts the name's live leases (per tenant when it
must) and its claims within the rate's period, leases only what the limits leave room for, and
stores one start per claim of a rate-limited name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
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

from prorch.model.limit_rules import ClaimLimit, Tally, TenantKey, within_limits
from prorch.model.status import Status
from repositories.schema import rate_limit_starts
from repositories.sql_listing import json_field_equals

SCALAR_TYPES = {"postgresql": ("string", "number", "boolean"), "sqlite": ("text", "integer", "real", "true", "false")}


class LimitedClaim:
    """The statements of a limited claim on one pipelines table, built once."""

    def __init__(
        self, table: Table, dialect: str, due: Select[Any], lockable: Callable[[Select[Any]], Select[Any]],
        lease_values: dict[str, Any],
    ) -> None:  # fmt: skip
        """``due``: the due query of the table (uuids in claim order; bound: _now, _limit);
        ``lockable``: it as a claim's subquery (``SQLRepository.lockable``)."""
        c, starts = table.c, rate_limit_starts.c
        self.table, self.dialect, self.lease_values = table, dialect, lease_values
        self.due = due.where(c.name == bindparam("_name"))
        now = bindparam("_now", type_=c.lease_expires_at.type)
        # by ix_pipelines_leased (name, lease_owner) of leased rows: their expiry is checked on the row
        live = (
            c.name == bindparam("_name"),
            c.lease_owner.is_not(None),
            c.status == Status.PENDING.value,
            c.lease_expires_at > now,
        )
        self.running = select(func.count()).where(*live)
        self.leased = select(c.name, c.context).where(*live)
        self.claim_some = (
            update(table).where(c.uuid.in_(lockable(self.due).scalar_subquery()))
            .values(lease_values).returning(*table.columns)
        )  # fmt: skip
        since = bindparam("_since", type_=starts.started_at.type)
        self.prune = delete(rate_limit_starts).where(starts.name == bindparam("_name"), starts.started_at <= since)
        self.started = select(func.count()).where(starts.name == bindparam("_name"))
        self.record = insert(rate_limit_starts)

    def claim(
        self, connection: Connection, name: str, limits: dict[str, ClaimLimit], params: dict[str, Any], most: int
    ) -> list[Any]:
        """Lease up to ``most`` due pipelines of ``name`` within its limits; the leased rows."""
        limit = limits[name]
        tally = Tally(limits)
        bound = {"_name": name, "_now": params["_now"]}
        if limit.rate is not None:
            connection.execute(self.prune, {"_name": name, "_since": params["_now"] - limit.rate.period})
            tally.started[name] = connection.execute(self.started, {"_name": name}).scalar_one()
        if limit.per_tenant is not None:
            tally.add_leased(row._mapping for row in connection.execute(self.leased, bound))
        elif limit.max_running is not None:
            tally.running[name] = connection.execute(self.running, bound).scalar_one()
        room = tally.room(name)
        room = most if room is None else min(room, most)
        if room <= 0:
            return []
        if limit.per_tenant is None:
            rows = list(connection.execute(self.claim_some, {**params, "_name": name, "_limit": room}).mappings())
        else:
            rows = self._claim_per_tenant(connection, name, tally, params, room)
        if limit.rate is not None and rows:
            connection.execute(
                self.record, [{"name": name, "started_at": params["_now"], "pipeline_uuid": r["uuid"]} for r in rows]
            )
        return rows

    def _claim_per_tenant(
        self, connection: Connection, name: str, tally: Tally, params: dict[str, Any], room: int
    ) -> list[Any]:
        """Candidates of the tenants not yet full, a window at a time: each window fills at
        least one more tenant, or the room, or is the last one, so a tenant with many due
        pipelines never hides the others behind it."""
        c = self.table.c
        rows: list[Any] = []
        while room > 0:
            window = self.due.add_columns(c.name, c.context).where(
                *[self._not_of(tenant) for tenant in tally.full_tenants(name)]
            )
            requested = room
            found = connection.execute(window, {**params, "_name": name, "_limit": requested}).all()
            chosen = within_limits([(row._mapping, row.uuid) for row in found], tally, requested)
            if chosen:
                lease = update(self.table).where(c.uuid.in_(chosen), *self._still_due()).values(self.lease_values)
                rows += connection.execute(lease.returning(*self.table.columns), params).mappings().all()
            room -= len(chosen)
            if len(found) < requested or not chosen:
                break  # the last window: no more candidates
        return rows

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
