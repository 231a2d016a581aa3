"""``Pipeline``: declare the steps, create runs, and (seed form) run one in this process."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from prorch.engine import DEFAULT_LEASE_SECONDS, Outcome, Runner
from prorch.model.clock import Clock
from prorch.model.definition import PipelineDefinition
from prorch.model.exceptions import InvalidKeyError, InvalidStateError, NotRegisteredError, PipelineNotFoundError
from prorch.model.records import JSONDict, PipelineRecord, new_uuid
from prorch.model.registry import Registry, current_registry
from prorch.model.status import Status
from prorch.storage.creation import build_records, check_declared, create_pipelines, store_new
from prorch.storage.leases import LeaseKeeper
from prorch.storage.repository import RepositoryLike
from prorch.storage.singletons import IfRunning, check_options, create_single
from prorch.storage.store import Store, store_for


def new_owner_id() -> str:
    """Identifies one orchestrator (or one in-process start) in leases and logs."""
    return f"{socket.gethostname()}:{os.getpid()}:{new_uuid()[:8]}"


def pipeline_class(registry: Registry, name: str, version: int | None = None) -> type[Pipeline]:
    """The registered ``Pipeline`` class of that name, for creating one by name (the CLI)."""
    found = registry.pipeline(name, version)
    if not issubclass(found, Pipeline):
        raise NotRegisteredError(f"pipeline {name!r} is prorch's own and cannot be started by hand", name=name)
    return found


class Pipeline(PipelineDefinition):
    """Base class of a pipeline: set ``name`` and ``steps`` and register it with
    ``@register_pipeline``.

    Optional class attributes: ``version`` (int, default 1), ``priority`` (higher runs first),
    ``Params`` (a pydantic model that validates ``create(params=...)``).
    """

    created: bool
    """False when ``create`` found the pipeline already stored under its key."""

    def __init__(
        self,
        repository_class: RepositoryLike | None = None,
        pipeline_uuid: str | None = None,
        *,
        repository: RepositoryLike | None = None,
        params: Any = None,
        clock: Clock | None = None,
        registry: Registry | None = None,
    ) -> None:
        """The prorch 1.0.1 form: with no ``pipeline_uuid``, store a new pipeline as ``created``
        (run it with ``.start()``); with one, load that pipeline. Prefer ``create`` / ``load``."""
        self._registry = registry or current_registry()
        check_declared(type(self), self._registry)
        self._store = store_for(repository if repository is not None else repository_class)
        self._clock: Clock = self._store.clock(clock)
        self.created = pipeline_uuid is None
        if pipeline_uuid is not None:
            self.record = self._fetch(pipeline_uuid)
        else:
            self.record = self._insert(params)

    # --- creating and loading -----------------------------------------------------------------

    @classmethod
    def create(
        cls,
        repository: RepositoryLike,
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
        if_running: IfRunning = "same",
        debounce: timedelta | None = None,
        attributes: dict[str, str] | None = None,
    ) -> Pipeline:
        """Validate ``params`` and store the pipeline as pending and due now, running no hook:
        the next orchestrator pass runs it. Raises ``InvalidParamsError`` and stores nothing when
        the params are invalid. ``version`` picks another registered version of this pipeline;
        the pipeline then runs exactly that version and its steps' versions to the end.

        ``key`` (any string up to 200 characters: an order id, a request id) creates the
        pipeline exactly once: a later create with that key, this pipeline's name and equal
        params returns the stored pipeline with ``created`` False; with another name or other
        params it raises ``KeyConflictError``. ``uuid`` does the same with a uuid of your own.
        ``registry`` is where this class is registered (default: the global one).

        ``if_running="attach"`` returns the key's pipeline that has not ended, whatever its params,
        and ``"error"`` raises ``KeyRunningError`` while there is one; with either, once the
        key's pipeline has ended the next create starts a new one. ``debounce`` (a timedelta,
        with ``key``): creates within the window update the one pipeline still waiting (params
        from ``merge``, the last by default) and push its start to the window's end; once it
        has been claimed, the next create starts a new one (docs/concepts.md).

        ``attributes`` are search attributes (str to str) to list and act on it by (a debounced
        create that updates the waiting pipeline leaves its attributes as they were)."""
        registry = registry or current_registry()
        if_running, debounce = check_options(key, if_running, debounce)
        if version is not None and version != cls.version:
            target = pipeline_class(registry, cls.name or "", version)
            return target.create(
                repository, params, key=key, tenant=tenant, context=context, priority=priority, clock=clock,
                uuid=uuid, registry=registry, if_running=if_running, debounce=debounce, attributes=attributes,
            )  # fmt: skip
        if key is not None and (if_running != "same" or debounce is not None):
            if uuid is not None:
                raise InvalidKeyError("give key= or uuid=, not both: with if_running or debounce the key finds it")
            store = store_for(repository)
            clock = store.clock(clock)
            record, made = create_single(
                store, cls, params, key, if_running=if_running, debounce=debounce, registry=registry, clock=clock,
                context=context, tenant=tenant, priority=priority, attributes=attributes,
            )  # fmt: skip
            return cls._bound(store, clock, record, created=made, registry=registry)
        (created,) = cls._create_all(
            repository, [params], [key], tenant=tenant, context=context, priority=priority, clock=clock, uuid=uuid,
            registry=registry, attributes=attributes,
        )  # fmt: skip
        return created

    @classmethod
    def create_many(
        cls,
        repository: RepositoryLike,
        params: Iterable[Any],
        *,
        keys: Iterable[str | None] | None = None,
        tenant: str | None = None,
        context: JSONDict | None = None,
        priority: int | None = None,
        clock: Clock | None = None,
        registry: Registry | None = None,
        attributes: dict[str, str] | None = None,
    ) -> list[Pipeline]:
        """``create`` for a batch, in one transaction: every params is validated first, and an
        invalid one raises ``InvalidParamsError`` naming its index, storing nothing. ``keys``
        (one per params, or None) work as ``create``'s ``key``: the pipelines already stored
        under their keys come back with ``created`` False, and one conflict stores nothing.
        ``attributes`` are given to every pipeline of the batch."""
        items = list(params)
        key_list: list[str | None] = list(keys) if keys is not None else [None] * len(items)
        if len(key_list) != len(items):
            raise InvalidKeyError(
                f"create_many got {len(items)} params and {len(key_list)} keys; give one key per params"
            )
        return cls._create_all(
            repository, items, key_list, tenant=tenant, context=context, priority=priority, clock=clock,
            registry=registry or current_registry(), attributes=attributes,
        )  # fmt: skip

    @classmethod
    def _create_all(
        cls,
        repository: RepositoryLike,
        items: list[Any],
        keys: list[str | None],
        *,
        tenant: str | None,
        context: JSONDict | None,
        priority: int | None,
        clock: Clock | None,
        registry: Registry,
        uuid: str | None = None,
        attributes: dict[str, str] | None = None,
    ) -> list[Pipeline]:
        store = store_for(repository)
        clock = store.clock(clock)
        stored = create_pipelines(
            store, cls, items, keys, registry=registry, clock=clock, context=context, tenant=tenant,
            priority=priority, uuid=uuid, attributes=attributes,
        )  # fmt: skip
        return [cls._bound(store, clock, record, created=created, registry=registry) for record, created in stored]

    @classmethod
    def _bound(
        cls, store: Store, clock: Clock, record: PipelineRecord, *, created: bool, registry: Registry
    ) -> Pipeline:
        """An instance for a record, without the 1.0.1 constructor's side effects."""
        self = cls.__new__(cls)
        self._store, self._clock, self._registry = store, clock, registry
        self.created, self.record = created, record
        return self

    @classmethod
    def load(
        cls, repository: RepositoryLike, uuid: str, *, clock: Clock | None = None, registry: Registry | None = None
    ) -> Pipeline:
        """The stored pipeline ``uuid`` (of this class)."""
        return cls(repository=repository, pipeline_uuid=uuid, clock=clock, registry=registry)

    def _insert(self, params: Any) -> PipelineRecord:
        """The seed form's new pipeline: stored as ``created``, not due until ``start()``."""
        now = self._clock.now()
        records = build_records(type(self), self.validate_params(params), now=now, status=Status.CREATED)
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
        since = time.monotonic()  # before the lease's time is read: see LeaseKeeper
        now = self._clock.now()
        lease_until = now + timedelta(seconds=DEFAULT_LEASE_SECONDS)
        record = self._store.claim_one(self.uuid, now, owner, lease_until)
        if record is None:
            raise InvalidStateError(f"pipeline {self.uuid} is being run by another orchestrator; try again later")
        runner = Runner(self._store, self._registry, self._clock)
        try:
            with LeaseKeeper(self._store, DEFAULT_LEASE_SECONDS, self._clock) as keeper:
                keeper.hold([record], since)
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
