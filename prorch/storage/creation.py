"""Storing new pipelines: their records built from a definition, written in one transaction with
the records their ``pipeline.created`` events trigger, and, for a key or uuid, exactly once.

``Pipeline.create`` and the hook runtime (a reaction starting a pipeline) both come here, so a
pipeline is created the same way from a web request and from inside the engine."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from prorch.model import attributes as search_attributes
from prorch.model import trace_context
from prorch.model.clock import Clock
from prorch.model.definition import PipelineDefinition
from prorch.model.exceptions import (
    DuplicateRecordError,
    InvalidKeyError,
    InvalidParamsError,
    KeyConflictError,
    NotRegisteredError,
    PipelineNameNotDefinedError,
    StepsNotDefinedError,
    UnstorableValueError,
)
from prorch.model.jsonvalue import checked_copy
from prorch.model.keys import check_uuid, uuid_for_key
from prorch.model.limit_rules import concurrency_key_of
from prorch.model.patches import PATCHES, to_record
from prorch.model.records import EventRecord, JSONDict, PipelineRecord, Record, StepRecord, new_uuid
from prorch.model.registry import Registry
from prorch.model.status import TERMINAL, EventType, Status
from prorch.storage import listing
from prorch.storage.store import Store

STORE_ONCE_ATTEMPTS = 3
"""Look-ups of a keyed create that lost a race to an equal create (PostgreSQL) before giving up."""


def create_pipelines(
    store: Store,
    definition: type[PipelineDefinition],
    items: Sequence[Any],
    keys: Sequence[str | None],
    *,
    registry: Registry,
    clock: Clock,
    context: JSONDict | None = None,
    tenant: str | None = None,
    priority: int | None = None,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    attributes: JSONDict | None = None,
) -> list[tuple[PipelineRecord, bool]]:
    """Validate every params first, then store the pipelines, pending and due now, in one
    transaction. Returns each pipeline's record and whether it was created now (False: its key
    or uuid named an equal pipeline already stored). Invalid params or attributes store nothing."""
    check_declared(definition, registry)
    merged = with_tenant(context, tenant)
    labels = search_attributes.checked(attributes)
    validated = []
    for index, item in enumerate(items):
        try:
            validated.append(definition.validate_params(item))
        except InvalidParamsError as exc:
            raise InvalidParamsError(f"params #{index}: {exc}" if len(items) > 1 else str(exc)) from exc
    uuids = [uuid_for_key(key) if key is not None else None for key in keys]
    if uuid is not None:
        if list(keys) != [None]:
            raise InvalidKeyError("give key= or uuid=, not both: a keyed pipeline's uuid comes from its key")
        uuids = [check_uuid(uuid)]
    now = clock.now()
    groups = [
        build_records(
            definition,
            item,
            now=now,
            context=merged,
            priority=priority,
            uuid=given,
            key=key,
            parent_uuid=parent_uuid,
            trace=trace_context.new_carrier(definition.name),
            attributes=labels,
        )
        for item, given, key in zip(validated, uuids, keys, strict=True)
    ]
    if all(given is None for given in uuids):  # nothing to look up: new uuids cannot collide
        return [(record, True) for record in store_new(store, groups, now, registry)]
    return store_once(store, groups, now, registry)


def check_declared(definition: type[PipelineDefinition], registry: Registry) -> None:
    """The class declares a name and steps, and is the one registered under its name and version."""
    if not definition.name:
        raise PipelineNameNotDefinedError(f"pipeline class {definition.__qualname__} has no `name`")
    if not definition.steps:
        raise StepsNotDefinedError(f"pipeline {definition.name} has no `steps`")
    registered = registry.pipelines.get(definition.name, {}).get(definition.version)
    if registered is not definition:
        raise NotRegisteredError(
            f"pipeline {definition.name} is not registered: decorate {definition.__qualname__} with "
            "@register_pipeline so that the orchestrator can resume it"
        )


PRIORITY_RANGE = (-(2**31), 2**31 - 1)
"""What every store holds in ``priority`` (a 32-bit integer column on PostgreSQL)."""


def checked_priority(priority: int) -> int:
    """``priority``, or one clear error (``InvalidParamsError``) when no store could hold it: a
    database's refusal would come late, worded as the store's failure (the API's 503)."""
    low, high = PRIORITY_RANGE
    if isinstance(priority, bool) or not isinstance(priority, int) or not low <= priority <= high:
        raise InvalidParamsError(f"priority must be a whole number from {low} to {high}, got {priority!r}")
    return priority


def build_records(
    definition: type[PipelineDefinition],
    params: JSONDict,
    *,
    now: datetime,
    status: Status = Status.PENDING,
    context: JSONDict | None = None,
    priority: int | None = None,
    uuid: str | None = None,
    key: str | None = None,
    parent_uuid: str | None = None,
    trace: JSONDict | None = None,
    attributes: dict[str, str] | None = None,
) -> list[Record]:
    """A new pipeline's records, in write order: its steps, its ``pipeline.created`` event, and
    the pipeline itself (due now when pending). ``params`` must be validated already."""
    priority = checked_priority(definition.priority if priority is None else priority)
    record = PipelineRecord(
        uuid=uuid or new_uuid(),
        name=definition.name or "",
        version=definition.version,
        status=status,
        params=params,
        context=context or {},
        metadata=_metadata(definition),
        priority=priority,
        created_at=now,
        updated_at=now,
        next_run_at=now if status == Status.PENDING else None,
        key=key,
        parent_uuid=parent_uuid,
        trace=trace,
        concurrency_key=concurrency_key_for(definition, params, context),
        attributes=dict(attributes) if attributes else {},
    )
    steps: list[Record] = [
        StepRecord(
            uuid=new_uuid(),
            pipeline_uuid=record.uuid,
            name=step.name or "",
            version=step.version,
            position=position,
            status=Status.CREATED,
        )
        for position, step in enumerate(definition.steps)
    ]
    created = EventRecord(
        uuid=new_uuid(),
        pipeline_uuid=record.uuid,
        type=EventType.PIPELINE_CREATED,
        at=now,
        data={"name": record.name, "version": record.version},
    )
    return [*steps, created, record]


def _metadata(definition: type[PipelineDefinition]) -> JSONDict:
    """A new pipeline's metadata: the seed's current step and, when its class declares any, the
    patches it is created with (``prorch.model.patches``), never changed afterwards."""
    patches = to_record(definition)
    return {"current_step": None, PATCHES: patches} if patches else {"current_step": None}


def store_new(store: Store, groups: list[list[Record]], now: datetime, registry: Registry) -> list[PipelineRecord]:
    """Store new pipelines (each group from ``build_records``) and what their ``pipeline.created``
    events trigger (reaction tasks), in one transaction: steps first, pipelines last, so a
    pipeline record is never visible without its steps. Returns the pipeline records."""
    records = [record for group in groups for record in group]
    pipelines = [record for record in records if isinstance(record, PipelineRecord)]
    created = [record for record in records if isinstance(record, EventRecord)]
    triggered = registry.records_for_created(pipelines[0].name, created, now) if pipelines else []
    order = {StepRecord.MODEL: 0, EventRecord.MODEL: 1, PipelineRecord.MODEL: 2}
    store.insert_all([*triggered, *sorted(records, key=lambda record: order[record.MODEL])])
    return pipelines


def store_once(
    store: Store, groups: list[list[Record]], now: datetime, registry: Registry
) -> list[tuple[PipelineRecord, bool]]:
    """Store the new pipelines whose uuid (from a key) is not stored yet, in one transaction;
    return each pipeline's record and whether it was created now. A uuid already stored must
    name an equal pipeline (name and params), else ``KeyConflictError`` and nothing is stored.

    The look-up and the inserts share one transaction: writers take turns on SQLite, TinyDB
    and the memory store. On PostgreSQL two transactions can both find nothing; the second
    insert then fails on the uuid's uniqueness, and the look-up runs again and finds the first.
    The keys' locks (in one order, so two batches cannot deadlock) make a create with
    ``if_running`` or ``debounce``, which stores a uuid of its own, wait for this one and the
    other way round, so that the look-up by key sees what the other stored."""
    keys = sorted(
        {record.key for group in groups for record in group if isinstance(record, PipelineRecord) and record.key}
    )
    for attempt in range(1, STORE_ONCE_ATTEMPTS + 1):
        try:
            with store.transaction():
                store.lock_keys(keys)
                results, fresh = _sort_out(store, groups)
                if fresh:
                    store_new(store, fresh, now, registry)
            return results
        except DuplicateRecordError:
            if attempt == STORE_ONCE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _sort_out(store: Store, groups: list[list[Record]]) -> tuple[list[tuple[PipelineRecord, bool]], list[list[Record]]]:
    """Each group's pipeline as stored (or as it will be), whether it is new, and the groups to
    insert. The stored ones are read by key, then by uuid those not found so (a uuid given
    without a key, or one stored without its key), a chunk of values per query rather than one
    query per key (20,000 round trips on PostgreSQL), in the caller's transaction."""
    results: list[tuple[PipelineRecord, bool]] = []
    fresh: list[list[Record]] = []
    taken: dict[str, PipelineRecord] = {}
    pipelines = [next(record for record in group if isinstance(record, PipelineRecord)) for group in groups]
    by_key = store.pipelines_with_keys([key for key in dict.fromkeys(r.key for r in pipelines) if key is not None])
    live = live_holders(by_key)
    stored = {record.uuid: record for records in by_key.values() for record in records}
    stored |= store.get_pipelines([uuid for uuid in dict.fromkeys(r.uuid for r in pipelines) if uuid not in stored])
    for group, wanted in zip(groups, pipelines, strict=True):
        found = taken.get(wanted.uuid) or stored.get(wanted.uuid) or live.get(wanted.key or "")
        if found is None:
            taken[wanted.uuid] = wanted
            fresh.append(group)
            results.append((wanted, True))
            continue
        if found.name != wanted.name or found.params != wanted.params:
            raise KeyConflictError(_conflict(found, wanted))
        results.append((found, False))
    return results, fresh


def live_holders(found: dict[str, list[PipelineRecord]]) -> dict[str, PipelineRecord]:
    """``live_holder`` of each key that has one, among its pipelines ``found``."""
    holders = {key: max((r for r in records if holds_key(r)), key=listing.newest_first, default=None)
               for key, records in found.items()}  # fmt: skip
    return {key: holder for key, holder in holders.items() if holder is not None}


def live_holder(store: Store, key: str, *, other_than: str | None = None) -> PipelineRecord | None:
    """The newest pipeline of ``key`` that has not ended (other than ``other_than``): while it
    lives it holds the key, whether a create with ``if_running`` or ``debounce`` started it under
    a uuid of its own or the default one did. A default create returns it (or conflicts) and an
    operator's retry of an ended pipeline of the key is refused, rather than run two at once."""
    live = [record for record in store.pipelines_with_key(key) if holds_key(record)]
    return max((record for record in live if record.uuid != other_than), key=listing.newest_first, default=None)


def holds_key(record: PipelineRecord) -> bool:
    """Whether ``record`` holds its key against a second live pipeline: it has not ended, and no
    cancel of it is pending (that one ends cancelled, and would take a create's work with it)."""
    return record.status not in TERMINAL and not record.cancel_requested


def _conflict(found: PipelineRecord, wanted: PipelineRecord) -> str:
    taken_by = f"key {found.key!r}" if found.key is not None else f"uuid {found.uuid}"
    return (
        f"{taken_by} already names pipeline {found.name} {found.uuid} with params {_shown(found.params)}"
        f"{other_tenant(found, wanted.context.get('tenant'))}; "
        f"this create asked for {wanted.name} with params {_shown(wanted.params)}; use another key, "
        "or the same name and params to get the stored pipeline"
    )


def other_tenant(found: PipelineRecord, tenant: Any) -> str:
    """Where a create of one tenant met another tenant's pipeline, the words that say why: keys
    are global (a tenant is not part of the key), so the fix is a key that names the tenant."""
    stored = found.context.get("tenant")
    if stored == tenant:
        return ""
    return (
        f" of tenant {stored!r} (this create is of tenant {tenant!r}: keys are global, not per tenant; "
        "put the tenant in the key, e.g. f'{tenant}:order-1')"
    )


def _shown(params: JSONDict) -> str:
    text = json.dumps(params, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= 300 else text[:297] + "..."


def concurrency_key_for(definition: type[PipelineDefinition], params: JSONDict, context: JSONDict | None) -> str:
    """The class's concurrency key of these params (by default the tenant), stored with the
    pipeline so that the claim counts and groups by it without reading params or context; a
    bad key is the params' error (nothing is stored)."""
    try:
        return concurrency_key_of(definition, params, context)
    except ValueError as exc:
        raise InvalidParamsError(f"pipeline {definition.name}: {exc}") from exc


def with_tenant(context: JSONDict | None, tenant: str | None) -> JSONDict:
    """The pipeline's context with its tenant, checked storable."""
    merged = dict(context or {})
    if tenant is not None:
        merged["tenant"] = tenant
    try:
        copied: JSONDict = checked_copy(merged, "context")
    except UnstorableValueError as exc:
        raise InvalidParamsError(f"the pipeline's context cannot be stored: {exc}") from exc
    return copied
