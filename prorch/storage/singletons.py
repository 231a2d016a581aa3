"""Creating by key when the key names one *live* pipeline rather than one pipeline for ever:
``if_running="attach"`` (return the live one), ``"error"`` (refuse while one is live) and
``debounce`` (creates within a quiet window collapse into one pipeline that waits out the window).

A key here may name several pipelines over time, so the pipelines get uuids of their own and are
found by their ``key`` column. Each create looks the key up and inserts (or updates) in one
transaction that holds the key's lock (``Backend.lock_key``): one create per key at a time in
every process. A debounced update is a compare-and-set on the pipeline's revision, which a claim
moves too: a create landing while a worker claims the pipeline finds it claimed on its next try
and creates a new one, so its params are never lost."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal, cast, get_args

from prorch.model import trace_context
from prorch.model.attributes import checked as checked_attributes
from prorch.model.clock import Clock
from prorch.model.definition import PipelineDefinition
from prorch.model.exceptions import (
    ConcurrentUpdateError,
    InvalidKeyError,
    InvalidParamsError,
    KeyConflictError,
    KeyRunningError,
)
from prorch.model.keys import check_key
from prorch.model.records import JSONDict, PipelineRecord, Record
from prorch.model.registry import Registry
from prorch.model.status import Status
from prorch.storage import creation, listing
from prorch.storage.store import Store

IfRunning = Literal["same", "attach", "error"]
"""What a keyed create does when the key names a pipeline that has not ended (``create(if_running=)``):
``"same"`` (the default) returns it when its name and params are equal, else ``KeyConflictError``
(and likewise an ended one while it is stored: the key names one pipeline); ``"attach"`` returns
the live one whatever its params; ``"error"`` raises ``KeyRunningError``. With ``"attach"`` and
``"error"`` an ended pipeline does not hold its key: the next create starts a new one."""
IF_RUNNING: tuple[str, ...] = get_args(IfRunning)
UPDATE_ATTEMPTS = 5
"""Tries of a keyed create whose compare-and-set lost to a claim (or a cancel) of the pipeline."""


def check_options(key: str | None, if_running: object, debounce: object) -> tuple[IfRunning, timedelta | None]:
    """``if_running`` and ``debounce`` as given to ``create``, or one clear error before anything is stored."""
    if if_running not in IF_RUNNING:
        raise InvalidParamsError(
            f"if_running={if_running!r}: use one of {', '.join(repr(mode) for mode in IF_RUNNING)}"
        )
    if debounce is not None:
        if not isinstance(debounce, timedelta) or debounce <= timedelta(0):
            raise InvalidParamsError(
                f"debounce={debounce!r}: give a positive timedelta, e.g. debounce=timedelta(seconds=30)"
            )
        if if_running != "same":
            raise InvalidParamsError(
                f"debounce= and if_running={if_running!r} do not combine: a debounced create updates the "
                "pipeline still waiting in its window, or starts a new one"
            )
    needs_key = "debounce=" if debounce is not None else f"if_running={if_running!r}" if if_running != "same" else None
    if needs_key is not None and key is None:
        raise InvalidKeyError(f"{needs_key} needs key=: the key names the pipeline that later creates find")
    return cast(IfRunning, if_running), debounce


def create_single(
    store: Store,
    definition: type[PipelineDefinition],
    params: object,
    key: str,
    *,
    if_running: IfRunning,
    debounce: timedelta | None,
    registry: Registry,
    clock: Clock,
    context: JSONDict | None = None,
    tenant: str | None = None,
    priority: int | None = None,
    attributes: dict[str, str] | None = None,
) -> tuple[PipelineRecord, bool]:
    """Create (True) or find or update (False) the pipeline of ``key`` by ``if_running`` or
    ``debounce``. Invalid params, key or options raise before anything is stored."""
    creation.check_declared(definition, registry)
    check_key(key)
    merged_context = creation.with_tenant(context, tenant)
    validated = definition.validate_params(params)
    searchable = checked_attributes(attributes)
    for attempt in range(1, UPDATE_ATTEMPTS + 1):
        try:
            return _create_or_find(
                store, definition, validated, key, if_running=if_running, debounce=debounce, registry=registry,
                clock=clock, context=merged_context, priority=priority, attributes=searchable,
            )  # fmt: skip
        except ConcurrentUpdateError:
            if attempt == UPDATE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _create_or_find(
    store: Store,
    definition: type[PipelineDefinition],
    params: JSONDict,
    key: str,
    *,
    if_running: IfRunning,
    debounce: timedelta | None,
    registry: Registry,
    clock: Clock,
    context: JSONDict,
    priority: int | None,
    attributes: dict[str, str],
) -> tuple[PipelineRecord, bool]:
    """One try of ``create_single``, in one transaction holding the key's lock."""
    with store.transaction():
        store.lock_key(key)
        found = store.pipelines_with_key(key)
        now = clock.now()
        if debounce is not None:
            kept = _debounced(store, definition, params, attributes, found, now + debounce, now)
        else:
            kept = _live(definition, found, key, if_running, context.get("tenant"))
        if kept is not None:
            return kept, False
        group = creation.build_records(
            definition, params, now=now, context=context, priority=priority, key=key,
            trace=trace_context.new_carrier(definition.name), attributes=attributes,
        )  # fmt: skip
        if debounce is not None:
            _wait_until(group, now + debounce)
        (record,) = creation.store_new(store, [group], now, registry)
        return record, True


def _live(
    definition: type[PipelineDefinition], found: list[PipelineRecord], key: str, if_running: IfRunning, tenant: Any
) -> PipelineRecord | None:
    """The live pipeline of ``key`` that this create returns (attach), or None to create one. A
    pipeline whose cancel is requested (while a worker held it) will end cancelled: it holds the
    key no more, else the work of a create attached to it would be cancelled with it."""
    live = newest([record for record in found if creation.holds_key(record)])
    if live is None:
        return None
    _same_name(definition, live, key)
    if if_running == "error":
        raise KeyRunningError(
            f"key {key!r} names pipeline {live.name} {live.uuid}{creation.other_tenant(live, tenant)}, "
            f"which has not ended ({live.status.value}); "
            "if_running='error' stores no second one: wait for it to end, or pass if_running='attach' to get it"
        )
    return live


def _debounced(
    store: Store,
    definition: type[PipelineDefinition],
    params: JSONDict,
    attributes: dict[str, str],
    found: list[PipelineRecord],
    until: datetime,
    now: datetime,
) -> PipelineRecord | None:
    """The pipeline of the key still waiting in its window, given the merged params, this
    create's search attributes over its own (the later value wins: the pipeline does the later
    create's work too, and a search by its labels must find it) and due at ``until``; None when
    none waits (none was created, or it has been claimed: it started)."""
    waiting = newest([record for record in found if is_waiting(record)])
    if waiting is None:
        return None
    _same_name(definition, waiting, waiting.key or "")
    merged = definition.merge(dict(waiting.params), dict(params))
    try:
        waiting.params = definition.validate_params(merged)
    except InvalidParamsError as exc:
        raise InvalidParamsError(
            f"{definition.__qualname__}.merge() returned params that are not valid: {exc}; nothing was stored"
        ) from exc
    waiting.concurrency_key = creation.concurrency_key_for(definition, waiting.params, waiting.context)
    if attributes:
        waiting.attributes = {**waiting.attributes, **attributes}
    waiting.next_run_at, waiting.updated_at = until, now
    store.commit([waiting])  # ConcurrentUpdateError when a worker claimed it meanwhile: try again
    return waiting


def is_waiting(record: PipelineRecord) -> bool:
    """A debounced pipeline still in its window: pending, not claimed now (a claim sets
    ``claims`` and the lease), and never started: no step has started (``current_step``, set
    with the first) and no hook is marked running. A started pipeline whose step waits is
    unleased with ``claims`` 0 again, and must not be taken for one."""
    return (
        record.status == Status.PENDING
        and record.claims == 0
        and record.lease_owner is None
        and record.hook_started_at is None
        and record.metadata.get("current_step") is None
        and not record.cancel_requested
    )


def _same_name(definition: type[PipelineDefinition], found: PipelineRecord, key: str) -> None:
    if found.name != definition.name:
        raise KeyConflictError(
            f"key {key!r} names pipeline {found.name} {found.uuid}, which has not ended; this create asked "
            f"for {definition.name}: use another key"
        )


def _wait_until(group: list[Record], due: datetime) -> None:
    """Make the new pipeline of ``group`` due at the end of its window."""
    for record in group:
        if isinstance(record, PipelineRecord):
            record.next_run_at = due


def newest(records: list[PipelineRecord]) -> PipelineRecord | None:
    """The most recently created of ``records`` (None when empty)."""
    return max(records, key=listing.newest_first, default=None)
