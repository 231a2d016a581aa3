"""``Pipeline``: declare the steps, create runs, and (seed form) run one in this process."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError

from prorch.clock import Clock
from prorch.exceptions import (
    DuplicateRecordError,
    InvalidKeyError,
    InvalidParamsError,
    InvalidStateError,
    KeyConflictError,
    NotRegisteredError,
    PipelineNameNotDefinedError,
    PipelineNotFoundError,
    StepsNotDefinedError,
    UnstorableValueError,
)
from prorch.jsonvalue import checked_copy
from prorch.keys import check_uuid, uuid_for_key
from prorch.leases import LeaseKeeper
from prorch.records import EventRecord, JSONDict, PipelineRecord, Record, StepRecord, new_uuid
from prorch.registry import Registry, current_registry
from prorch.runner import DEFAULT_LEASE_SECONDS, Outcome, Runner
from prorch.status import EventType, Status
from prorch.step import Step
from prorch.store import Store, store_for


def new_owner_id() -> str:
    """Identifies one orchestrator (or one in-process start) in leases and logs."""
    return f"{socket.gethostname()}:{os.getpid()}:{new_uuid()[:8]}"


class Pipeline:
    """Base class of a pipeline: set ``name`` and ``steps`` and register it with
    ``@register_pipeline``.

    Optional class attributes: ``version`` (int, default 1), ``priority`` (higher runs first),
    ``Params`` (a pydantic model that validates ``create(params=...)``).
    """

    name: ClassVar[str | None] = None
    steps: ClassVar[Sequence[type[Step]]] = ()
    version: ClassVar[int] = 1
    priority: ClassVar[int] = 0
    Params: ClassVar[type[BaseModel] | None] = None

    created: bool
    """False when ``create`` found the pipeline already stored under its key."""

    def __init__(
        self,
        repository_class: Any = None,
        pipeline_uuid: str | None = None,
        *,
        repository: Any = None,
        params: Any = None,
        clock: Clock | None = None,
        registry: Registry | None = None,
    ) -> None:
        """The prorch 1.0.1 form: with no ``pipeline_uuid``, store a new pipeline as ``created``
        (run it with ``.start()``); with one, load that pipeline. Prefer ``create`` / ``load``."""
        self._registry = registry or current_registry()
        self._check_declared(self._registry)
        self._store = store_for(repository if repository is not None else repository_class)
        self._clock: Clock = self._store.clock(clock)
        self.created = pipeline_uuid is None
        if pipeline_uuid is not None:
            self.record = self._fetch(pipeline_uuid)
        else:
            self.record = self._insert(params, status=Status.CREATED, context={}, priority=None)

    # --- creating and loading -----------------------------------------------------------------

    @classmethod
    def create(
        cls,
        repository: Any,
        params: Any = None,
        *,
        key: str | None = None,
        tenant: str | None = None,
        context: JSONDict | None = None,
        priority: int | None = None,
        version: int | None = None,
        clock: Clock | None = None,
        uuid: str | None = None,
        registry: Registry | None = None,
    ) -> Pipeline:
        """Validate ``params`` and store the pipeline as pending and due now, running no hook:
        the next orchestrator pass runs it. Raises ``InvalidParamsError`` and stores nothing when
        the params are invalid. ``version`` picks another registered version of this pipeline;
        the pipeline then runs exactly that version and its steps' versions to the end.

        ``key`` (any string up to 200 characters: an order id, a request id) creates the
        pipeline exactly once: a later create with that key, this pipeline's name and equal
        params returns the stored pipeline with ``created`` False; with another name or other
        params it raises ``KeyConflictError``. ``uuid`` does the same with a uuid of your own.
        ``registry`` is where this class is registered (default: the global one)."""
        registry = registry or current_registry()
        if version is not None and version != cls.version:
            target: type[Pipeline] = registry.pipeline(cls.name or "", version)
            return target.create(
                repository, params, key=key, tenant=tenant, context=context, priority=priority, clock=clock,
                uuid=uuid, registry=registry,
            )  # fmt: skip
        (created,) = cls._create_all(
            repository, [params], [key], tenant=tenant, context=context, priority=priority, clock=clock, uuid=uuid,
            registry=registry,
        )  # fmt: skip
        return created

    @classmethod
    def create_many(
        cls,
        repository: Any,
        params: Iterable[Any],
        *,
        keys: Iterable[str | None] | None = None,
        tenant: str | None = None,
        context: JSONDict | None = None,
        priority: int | None = None,
        clock: Clock | None = None,
        registry: Registry | None = None,
    ) -> list[Pipeline]:
        """``create`` for a batch, in one transaction: every params is validated first, and an
        invalid one raises ``InvalidParamsError`` naming its index, storing nothing. ``keys``
        (one per params, or None) work as ``create``'s ``key``: the pipelines already stored
        under their keys come back with ``created`` False, and one conflict stores nothing."""
        items = list(params)
        key_list: list[str | None] = list(keys) if keys is not None else [None] * len(items)
        if len(key_list) != len(items):
            raise InvalidKeyError(
                f"create_many got {len(items)} params and {len(key_list)} keys; give one key per params"
            )
        return cls._create_all(
            repository, items, key_list, tenant=tenant, context=context, priority=priority, clock=clock,
            registry=registry or current_registry(),
        )  # fmt: skip

    @classmethod
    def _create_all(
        cls,
        repository: Any,
        items: list[Any],
        keys: list[str | None],
        *,
        tenant: str | None,
        context: JSONDict | None,
        priority: int | None,
        clock: Clock | None,
        registry: Registry,
        uuid: str | None = None,
    ) -> list[Pipeline]:
        cls._check_declared(registry)
        store = store_for(repository)
        clock = store.clock(clock)
        merged = _with_tenant(context, tenant)
        validated = []
        for index, item in enumerate(items):
            try:
                validated.append(cls.validate_params(item))
            except InvalidParamsError as exc:
                raise InvalidParamsError(f"params #{index}: {exc}" if len(items) > 1 else str(exc)) from exc
        uuids = [uuid_for_key(key) if key is not None else None for key in keys]
        if uuid is not None:
            if keys != [None]:
                raise InvalidKeyError("give key= or uuid=, not both: a keyed pipeline's uuid comes from its key")
            uuids = [check_uuid(uuid)]
        now = clock.now()
        groups = [
            build_records(cls, item, now=now, context=merged, priority=priority, uuid=given, key=key)
            for item, given, key in zip(validated, uuids, keys, strict=True)
        ]
        if all(given is None for given in uuids):  # nothing to look up: new uuids cannot collide
            new = store_new(store, groups, now, registry)
            return [cls._bound(store, clock, pipeline, registry=registry) for pipeline in new]
        stored = store_once(store, groups, now, registry)
        return [cls._bound(store, clock, record, created=created, registry=registry) for record, created in stored]

    @classmethod
    def _bound(
        cls, store: Store, clock: Clock, record: PipelineRecord | None, *, created: bool = True,
        registry: Registry | None = None,
    ) -> Pipeline:  # fmt: skip
        """An instance for a record, without the 1.0.1 constructor's side effects."""
        self = cls.__new__(cls)
        self._store, self._clock, self._registry = store, clock, registry or current_registry()
        self.created = created
        if record is not None:
            self.record = record
        return self

    @classmethod
    def load(
        cls, repository: Any, uuid: str, *, clock: Clock | None = None, registry: Registry | None = None
    ) -> Pipeline:
        """The stored pipeline ``uuid`` (of this class)."""
        return cls(repository=repository, pipeline_uuid=uuid, clock=clock, registry=registry)

    @classmethod
    def _check_declared(cls, registry: Registry) -> None:
        if not cls.name:
            raise PipelineNameNotDefinedError(f"pipeline class {cls.__qualname__} has no `name`")
        if not cls.steps:
            raise StepsNotDefinedError(f"pipeline {cls.name} has no `steps`")
        registered = registry.pipelines.get(cls.name, {}).get(cls.version)
        if registered is not cls:
            raise NotRegisteredError(
                f"pipeline {cls.name} is not registered: decorate {cls.__qualname__} with "
                "@register_pipeline so that the orchestrator can resume it"
            )

    @classmethod
    def validate_params(cls, params: Any) -> JSONDict:
        """``params`` as stored: checked against ``Params`` (or as JSON values), never converted."""
        if cls.Params is not None:
            if isinstance(params, dict) and cls.Params.model_config.get("extra") in (None, "ignore"):
                known = {name for name, f in cls.Params.model_fields.items()} | {
                    f.alias for f in cls.Params.model_fields.values() if f.alias
                }
                unknown = sorted(str(key) for key in params if key not in known)
                if unknown:
                    raise InvalidParamsError(
                        f"invalid params for pipeline {cls.name}: unknown key(s) {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(known)) or 'none'}); set model_config = "
                        "ConfigDict(extra='allow') on Params to accept others"
                    )
            try:
                model = params if isinstance(params, cls.Params) else cls.Params.model_validate(params or {})
            except RecursionError:
                raise InvalidParamsError(f"params for pipeline {cls.name} are nested too deeply") from None
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}" for err in exc.errors()
                )
                raise InvalidParamsError(f"invalid params for pipeline {cls.name}: {problems}") from exc
            result: JSONDict = model.model_dump(mode="json")
        elif params is None:
            return {}
        elif not isinstance(params, dict):
            raise InvalidParamsError(f"params for pipeline {cls.name} must be a dict, got {type(params).__name__}")
        else:
            result = params
        try:
            copied: JSONDict = checked_copy(result, "params")
        except UnstorableValueError as exc:
            raise InvalidParamsError(
                f"params for pipeline {cls.name} cannot be stored: {exc}; declare a Params pydantic model "
                "to accept richer types"
            ) from exc
        return copied

    def _insert(
        self, params: Any, *, status: Status, context: JSONDict, priority: int | None, uuid: str | None = None
    ) -> PipelineRecord:
        stored_params = self.validate_params(params)
        now = self._clock.now()
        records = build_records(
            type(self), stored_params, now=now, status=status, context=context, priority=priority, uuid=uuid
        )
        (pipeline,) = store_new(self._store, [records], now, self._registry)
        return pipeline

    def _fetch(self, uuid: str) -> PipelineRecord:
        record = self._store.get_pipeline(uuid)
        if record is None:
            raise PipelineNotFoundError(f"no pipeline with uuid {uuid} is stored", uuid=uuid)
        return record

    # --- running in this process (seed form) --------------------------------------------------

    def start(self) -> Outcome:
        """Run this pipeline's due work now, in this process, as the seed's ``start()`` did:
        the current step and, as each finishes, the next ones (up to the per-pass bound)."""
        owner = new_owner_id()
        now = self._clock.now()
        lease_until = now + timedelta(seconds=DEFAULT_LEASE_SECONDS)
        record = self._store.claim_one(self.uuid, now, owner, lease_until)
        if record is None:
            raise InvalidStateError(f"pipeline {self.uuid} is being run by another orchestrator; try again later")
        runner = Runner(self._store, self._registry, self._clock)
        try:
            with LeaseKeeper(self._store, DEFAULT_LEASE_SECONDS, self._clock) as keeper:
                keeper.hold([record])
                outcome = runner.advance(record, keeper)
        finally:
            runner.hooks.close()  # the event loop of its async hooks, if it had any
        self.refresh()
        return outcome

    def refresh(self) -> None:
        """Read the stored record again."""
        self.record = self._fetch(self.uuid)

    # --- reading ---------------------------------------------------------------------------

    @property
    def uuid(self) -> str:
        return self.record.uuid

    @property
    def status(self) -> str:
        return self.record.status.value

    @property
    def params(self) -> Any:
        if self.Params is not None:
            return self.Params.model_validate(self.record.params)
        return self.record.params

    @property
    def metadata(self) -> JSONDict:
        return self.record.metadata

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uuid} {self.status}>"


def build_records(
    pipeline_cls: type[Pipeline],
    params: JSONDict,
    *,
    now: datetime,
    status: Status = Status.PENDING,
    context: JSONDict | None = None,
    priority: int | None = None,
    uuid: str | None = None,
    key: str | None = None,
) -> list[Record]:
    """A new pipeline's records, in write order: its steps, its ``pipeline.created`` event, and
    the pipeline itself (due now when pending). ``params`` must be validated already."""
    record = PipelineRecord(
        uuid=uuid or new_uuid(),
        name=pipeline_cls.name or "",
        version=pipeline_cls.version,
        status=status,
        params=params,
        context=context or {},
        metadata={"current_step": None},
        priority=pipeline_cls.priority if priority is None else priority,
        created_at=now,
        updated_at=now,
        next_run_at=now if status == Status.PENDING else None,
        key=key,
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
        for position, step in enumerate(pipeline_cls.steps)
    ]
    created = EventRecord(
        uuid=new_uuid(),
        pipeline_uuid=record.uuid,
        type=EventType.PIPELINE_CREATED,
        at=now,
        data={"name": record.name, "version": record.version},
    )
    return [*steps, created, record]


def store_new(store: Store, groups: list[list[Record]], now: datetime, registry: Registry) -> list[PipelineRecord]:
    """Store new pipelines (each group from ``build_records``) and the reaction tasks their
    ``pipeline.created`` events trigger, in one transaction: steps first, pipelines last, so a
    pipeline record is never visible without its steps. Returns the pipeline records."""
    from prorch.reactions import reaction_tasks

    records = [record for group in groups for record in group]
    pipelines = [record for record in records if isinstance(record, PipelineRecord)]
    created = [record for record in records if isinstance(record, EventRecord)]
    tasks = reaction_tasks(registry, pipelines[0].name, created, now) if pipelines else []
    order = {StepRecord.MODEL: 0, EventRecord.MODEL: 1, PipelineRecord.MODEL: 2}
    store.insert_all([*tasks, *sorted(records, key=lambda record: order[record.MODEL])])
    return pipelines


STORE_ONCE_ATTEMPTS = 3


def store_once(
    store: Store, groups: list[list[Record]], now: datetime, registry: Registry
) -> list[tuple[PipelineRecord, bool]]:
    """Store the new pipelines whose uuid (from a key) is not stored yet, in one transaction;
    return each pipeline's record and whether it was created now. A uuid already stored must
    name an equal pipeline (name and params), else ``KeyConflictError`` and nothing is stored.

    The look-up and the inserts share one transaction: writers take turns on SQLite, TinyDB
    and the memory store. On PostgreSQL two transactions can both find nothing; the second
    insert then fails on the uuid's uniqueness, and the look-up runs again and finds the first."""
    for attempt in range(1, STORE_ONCE_ATTEMPTS + 1):
        try:
            with store.transaction():
                results, fresh = _sort_out(store, groups)
                if fresh:
                    store_new(store, fresh, now, registry)
            return results
        except DuplicateRecordError:
            if attempt == STORE_ONCE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _sort_out(store: Store, groups: list[list[Record]]) -> tuple[list[tuple[PipelineRecord, bool]], list[list[Record]]]:
    """Each group's pipeline as stored (or as it will be), whether it is new, and the groups to insert."""
    results: list[tuple[PipelineRecord, bool]] = []
    fresh: list[list[Record]] = []
    taken: dict[str, PipelineRecord] = {}
    for group in groups:
        wanted = next(record for record in group if isinstance(record, PipelineRecord))
        found = taken.get(wanted.uuid) or store.get_pipeline(wanted.uuid)
        if found is None:
            taken[wanted.uuid] = wanted
            fresh.append(group)
            results.append((wanted, True))
            continue
        if found.name != wanted.name or found.params != wanted.params:
            raise KeyConflictError(_conflict(found, wanted))
        results.append((found, False))
    return results, fresh


def _conflict(found: PipelineRecord, wanted: PipelineRecord) -> str:
    taken_by = f"key {found.key!r}" if found.key is not None else f"uuid {found.uuid}"
    return (
        f"{taken_by} already names pipeline {found.name} {found.uuid} with params {_shown(found.params)}; "
        f"this create asked for {wanted.name} with params {_shown(wanted.params)}; use another key, "
        "or the same name and params to get the stored pipeline"
    )


def _shown(params: JSONDict) -> str:
    text = json.dumps(params, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= 300 else text[:297] + "..."


def _with_tenant(context: JSONDict | None, tenant: str | None) -> JSONDict:
    merged = dict(context or {})
    if tenant is not None:
        merged["tenant"] = tenant
    try:
        copied: JSONDict = checked_copy(merged, "context")
    except UnstorableValueError as exc:
        raise InvalidParamsError(f"the pipeline's context cannot be stored: {exc}") from exc
    return copied
