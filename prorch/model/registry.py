"""Which code runs for a stored record: classes registered by name and version.

Stored data only ever selects code by looking a (name, version) up here; nothing stored is
imported, unpickled or evaluated.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel

from prorch.model.definition import PipelineDefinition
from prorch.model.exceptions import (
    DuplicateNameError,
    NotRegisteredError,
    PipelineNameNotDefinedError,
    RegistrationError,
    StepNameNotDefinedError,
    StepsNotDefinedError,
)
from prorch.model.limit_rules import limits_of
from prorch.model.mixins import OnContinueMixin, OnStartMixin, defines_hook
from prorch.model.patches import check_declared_patches
from prorch.model.records import EventRecord, Record
from prorch.model.schedule_rules import check_schedule_params, schedule_of
from prorch.model.step import Step

logger = logging.getLogger("prorch.model.registry")
StepT = TypeVar("StepT", bound=Step)
LookedUpT = TypeVar("LookedUpT")
PipelineT = TypeVar("PipelineT", bound=PipelineDefinition)


@dataclass(frozen=True)
class Plugin:
    """One registered plugin (see ``prorch.features.tenant_plugins.register_plugin``). Generic plugins
    (``tenant=None``) run for every tenant, before the tenant's own; within each group, lower
    ``order`` first, then registration order."""

    func: Callable[..., Any]
    step: str
    point: str
    tenant: str | None
    order: int
    sequence: int

    @property
    def name(self) -> str:
        return f"{self.func.__module__}.{self.func.__qualname__}"

    def sort_key(self) -> tuple[int, int, int]:
        return (self.tenant is not None, self.order, self.sequence)


class Registry:
    """Pipelines and steps by name, each with one or more versions, and the plugins registered
    for their plugin points."""

    def __init__(self) -> None:
        self.pipelines: dict[str, dict[int, type[PipelineDefinition]]] = {}
        self.steps: dict[str, dict[int, type[Step]]] = {}
        self.plugins: list[Plugin] = []  # prorch.features.tenant_plugins.register_plugin
        self.extensions: list[Any] = []
        """Extensions (``prorch.engine.extension.Extension``) that go with this registry wherever it is
        used: every orchestrator over it takes them, and creating a pipeline calls their
        ``on_transition`` with its ``pipeline.created`` events (reactions: ``prorch.features.reactions.install``)."""

    def records_for_created(self, pipeline_name: str, events: Sequence[EventRecord], now: datetime) -> list[Record]:
        """What this registry's extensions add to the commit creating pipelines (reaction tasks)."""
        added: list[Record] = []
        for extension in self.extensions:
            added += extension.on_transition(pipeline_name, events, now)
        return added

    def plugins_for(self, step: str, point: str, tenant: str | None) -> list[Plugin]:
        """The plugins to run for this step's point and tenant, in order."""
        found = [p for p in self.plugins if p.step == step and p.point == point and p.tenant in (None, tenant)]
        return sorted(found, key=Plugin.sort_key)

    # --- registering -------------------------------------------------------------------------

    def add_step(self, cls: type[StepT]) -> type[StepT]:
        if not (isinstance(cls, type) and issubclass(cls, Step)):
            raise RegistrationError(f"@register_step needs a Step subclass, got {cls!r}")
        if not isinstance(cls.name, str) or not cls.name:
            raise StepNameNotDefinedError(f'step class {cls.__qualname__} has no `name`: set name = "{cls.__name__}"')
        _check_version(cls)
        for mixin, hook in ((OnStartMixin, "on_start"), (OnContinueMixin, "on_continue")):
            if issubclass(cls, mixin) and not defines_hook(cls, hook):
                raise RegistrationError(
                    f"step {cls.name} mixes in {mixin.__name__} but defines no {hook}(): define it, or drop the mixin"
                )
        if not isinstance(cls.max_attempts, int) or cls.max_attempts < 1:
            raise RegistrationError(f"step {cls.name}: max_attempts must be an int >= 1")
        if cls.Output is not None and not _is_model(cls.Output):
            raise RegistrationError(f"step {cls.name}: Output must be a pydantic BaseModel subclass")
        self._add(self.steps, cls, "step")
        return cls

    def add_pipeline(self, cls: type[PipelineT]) -> type[PipelineT]:
        if not (isinstance(cls, type) and issubclass(cls, PipelineDefinition)):
            raise RegistrationError(f"@register_pipeline needs a Pipeline subclass, got {cls!r}")
        if not isinstance(cls.name, str) or not cls.name:
            raise PipelineNameNotDefinedError(
                f'pipeline class {cls.__qualname__} has no `name`: set name = "{cls.__name__}"'
            )
        _check_version(cls)
        if not isinstance(cls.steps, (list, tuple)) or not cls.steps:
            raise StepsNotDefinedError(f"pipeline {cls.name} has no `steps`: set steps = [FirstStep, SecondStep, ...]")
        seen: set[str] = set()
        for item in cls.steps:
            if not self.is_registered_step(item):
                raise RegistrationError(
                    f"pipeline {cls.name}: steps must hold registered Step classes, but {item!r} "
                    "is not one (decorate it with @register_step, above the pipeline)"
                )
            if item.name in seen:
                raise RegistrationError(
                    f"pipeline {cls.name} lists step {item.name} twice; step names in a pipeline "
                    "must be unique (outputs are keyed by name)"
                )
            seen.add(item.name)
        schedule = schedule_of(cls)  # a bad schedule is refused here, at import, not at the first pass
        limits_of(cls)  # a bad limit or rate too
        check_declared_patches(cls)
        if cls.Params is not None and not _is_model(cls.Params):
            raise RegistrationError(f"pipeline {cls.name}: Params must be a pydantic BaseModel subclass")
        if schedule is not None:
            check_schedule_params(cls, schedule)
        if isinstance(cls.priority, bool) or not isinstance(cls.priority, int):
            raise RegistrationError(f"pipeline {cls.name}: priority must be an int")
        self._add(self.pipelines, cls, "pipeline")
        return cls

    def _add(self, table: dict[str, dict[int, Any]], cls: type[Step] | type[PipelineDefinition], kind: str) -> None:
        name, version = cls.name or "", cls.version
        versions = table.setdefault(name, {})
        existing = versions.get(version)
        if existing is not None and existing is not cls and not _same_definition(existing, cls):
            raise DuplicateNameError(
                f"{kind} name {name!r} version {version} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}; choose another name or set version = N"
            )
        versions[version] = cls

    # --- looking up --------------------------------------------------------------------------

    def is_registered_step(self, item: object) -> bool:
        if not (isinstance(item, type) and issubclass(item, Step)):
            return False
        return self.steps.get(item.name or "", {}).get(item.version) is item

    def pipeline(self, name: str, version: int | None = None) -> type[PipelineDefinition]:
        """The pipeline class of that name: the given version, or the newest."""
        return _lookup(self.pipelines, "pipeline", name, version)

    def step(self, name: str, version: int | None = None) -> type[Step]:
        """The step class of that name: the given version, or the newest."""
        return _lookup(self.steps, "step", name, version)


def _lookup(table: dict[str, dict[int, LookedUpT]], kind: str, name: str, version: int | None) -> LookedUpT:
    versions = table.get(name)
    if not versions:
        known = ", ".join(sorted(table)) or "none"
        raise NotRegisteredError(
            f"no {kind} named {name!r} is registered (registered: {known}); import the module "
            "that defines it (e.g. prorch --app my_app.pipelines)",
            name=name,
        )
    if version is None:
        return versions[max(versions)]
    if version not in versions:
        raise NotRegisteredError(
            f"{kind} {name!r} version {version} is not registered (registered versions: "
            f"{', '.join(str(v) for v in sorted(versions))}); deploy the code that defines it",
            name=name,
        )
    return versions[version]


def _check_version(cls: Any) -> None:
    if isinstance(cls.version, bool) or not isinstance(cls.version, int) or cls.version < 1:
        raise RegistrationError(f"{cls.__qualname__}: version must be an int >= 1, got {cls.version!r}")


def _is_model(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def _same_definition(old: type, new: type) -> bool:
    """A module imported again (a reload, ``python -m`` plus import) re-registers the same class."""
    return (old.__module__, old.__qualname__) == (new.__module__, new.__qualname__)


_current = Registry()


def current_registry() -> Registry:
    """The registry that ``@register_pipeline`` / ``@register_step`` write to."""
    return _current


@contextlib.contextmanager
def isolated_registry() -> Iterator[Registry]:
    """Use a fresh, empty registry inside the block (for tests), then restore the previous one."""
    global _current
    previous, _current = _current, Registry()
    try:
        yield _current
    finally:
        _current = previous


def register_step(cls: type[StepT]) -> type[StepT]:
    """Class decorator: make a Step available to pipelines and to stored records by name."""
    return _current.add_step(cls)


def register_pipeline(cls: type[PipelineT]) -> type[PipelineT]:
    """Class decorator: make a Pipeline startable and resumable by name."""
    return _current.add_pipeline(cls)
