"""Pauses: a pipeline class (every version, or one), a tenant or one pipeline whose work is not
claimed until it is resumed. A pause is one stored row per scope, never a change to the paused
pipelines, so pausing a class of 100,000 pipelines writes one row and covers the pipelines created
while it holds; every claim checks a pipeline's few scope keys against the rows (SQL: a NOT EXISTS
on the primary key). One rule for every backend, the listing and the display."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prorch.model.exceptions import InvalidParamsError
from prorch.model.records import JSONDict, format_timestamp, to_utc

CLASS = "class"
TENANT = "tenant"
PIPELINE = "pipeline"
KINDS = (CLASS, TENANT, PIPELINE)

SCHEDULES_SKIP = "skip"
SCHEDULES_QUEUE = "queue"
SCHEDULE_MODES = (SCHEDULES_SKIP, SCHEDULES_QUEUE)
"""What a schedule of a paused class does at a tick: ``skip`` creates nothing (the default: a
pause is usually "stop this for now", and a cron job that piles up runs while paused floods the
workers on resume), ``queue`` creates the tick's pipeline, which waits, paused, until resume."""


def class_scope(name: str, version: int | None = None) -> str:
    return f"{CLASS}:{name}" if version is None else f"{CLASS}:{name}@{version}"


def tenant_scope(tenant: str) -> str:
    return f"{TENANT}:{tenant}"


def pipeline_scope(uuid: str) -> str:
    return f"{PIPELINE}:{uuid}"


def tenant_text(context: Mapping[str, Any] | None) -> str | None:
    """A pipeline's tenant as a pause names it: a text or an integer tenant, as text (the SQL
    stores extract it so); None for other tenants and for none."""
    tenant = (context or {}).get("tenant")
    if isinstance(tenant, bool) or not isinstance(tenant, (str, int)):
        return None
    return str(tenant)


def scopes_of(name: str, version: int, uuid: str, context: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The scope keys any of which pauses this pipeline."""
    tenant = tenant_text(context)
    found = (class_scope(name), class_scope(name, version), pipeline_scope(uuid))
    return found if tenant is None else (*found, tenant_scope(tenant))


def row_scopes(row: Mapping[str, Any]) -> tuple[str, ...]:
    """``scopes_of`` a stored pipeline row."""
    context = row.get("context")
    return scopes_of(str(row.get("name")), int(row.get("version") or 1), str(row.get("uuid")),
                     context if isinstance(context, Mapping) else None)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Pause:
    """One paused scope, who paused it, when and why."""

    kind: str
    value: str
    """The class name, the tenant or the pipeline uuid."""
    version: int | None = None
    """A class's one paused version (None: every version)."""
    since: datetime | None = None
    actor: str | None = None
    reason: str | None = None

    @property
    def scope(self) -> str:
        """The key the store holds the pause by: one pause per scope."""
        if self.kind == CLASS:
            return class_scope(self.value, self.version)
        return tenant_scope(self.value) if self.kind == TENANT else pipeline_scope(self.value)

    def label(self) -> str:
        """``class Billing v2``, ``tenant acme``, ``pipeline 1234...``."""
        version = f" v{self.version}" if self.version is not None else ""
        return f"{self.kind} {self.value}{version}"

    def describe(self) -> str:
        """``paused (class Billing, by cli: maintenance)``: why a pipeline is not claimed."""
        who = f"by {self.actor}" if self.actor else ""
        why = f"{who}: {self.reason}" if self.reason and who else (self.reason or who)
        return f"paused ({self.label()}{', ' + why if why else ''})"

    def to_dict(self) -> JSONDict:
        return {
            "scope": self.scope,
            "kind": self.kind,
            "value": self.value,
            "version": self.version,
            "since": format_timestamp(self.since) if self.since is not None else None,
            "actor": self.actor,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> Pause:
        since = row.get("since")
        if isinstance(since, str):
            since = datetime.fromisoformat(since)
        version = row.get("version")
        return cls(
            kind=str(row["kind"]),
            value=str(row["value"]),
            version=int(version) if version is not None else None,
            since=to_utc(since) if isinstance(since, datetime) else None,
            actor=row.get("actor"),
            reason=row.get("reason"),
        )


def make_pause(
    *,
    name: str | None = None,
    version: int | None = None,
    tenant: str | None = None,
    uuid: str | None = None,
    since: datetime | None = None,
    actor: str | None = None,
    reason: str | None = None,
) -> Pause:
    """The pause of exactly one scope: a class (``name``, optionally ``version``), a tenant or a
    pipeline; anything else is refused before anything is stored."""
    given = [kind for kind, value in ((CLASS, name), (TENANT, tenant), (PIPELINE, uuid)) if value is not None]
    if len(given) != 1:
        raise InvalidParamsError(
            "pause or resume exactly one scope: a class name (with a version or not), a tenant or a pipeline uuid; "
            f"got {', '.join(given) or 'none'}"
        )
    if version is not None and name is None:
        raise InvalidParamsError("a version names a version of a class: give the class name too")
    value = name if name is not None else tenant if tenant is not None else uuid
    if not isinstance(value, str) or not value.strip():
        raise InvalidParamsError(f"the {given[0]} to pause must be a non-empty text, got {value!r}")
    return Pause(given[0], value.strip(), version, since, actor, reason)


class Paused:
    """The stored pauses by scope, to ask which one (if any) holds a pipeline."""

    def __init__(self, pauses: Iterable[Pause] = ()) -> None:
        self.by_scope = {pause.scope: pause for pause in pauses}

    @classmethod
    def of_rows(cls, rows: Iterable[Mapping[str, Any]]) -> Paused:
        return cls(Pause.from_dict(row) for row in rows)

    def __bool__(self) -> bool:
        return bool(self.by_scope)

    def holding(self, scopes: Iterable[str]) -> Pause | None:
        """The pause that holds a pipeline of these scope keys (the narrowest first), or None."""
        if not self.by_scope:
            return None
        found = [self.by_scope[scope] for scope in scopes if scope in self.by_scope]
        order = {PIPELINE: 0, CLASS: 1, TENANT: 2}
        return min(found, key=lambda pause: (order[pause.kind], pause.version is None), default=None)

    def holds_row(self, row: Mapping[str, Any]) -> bool:
        """Whether a stored pipeline row is paused (a claim's filter)."""
        return bool(self.by_scope) and any(scope in self.by_scope for scope in row_scopes(row))
