"""Reactions (from open-integration's EventReaction): a function registered for an event type,
optionally of one pipeline or step, that may start other pipelines.

Each matching event gets one reaction task, stored in the same transaction as the event itself
(its uuid is derived from the event's and the reaction's names, so it exists exactly once). The
task is an ordinary internal pipeline, ``prorch.Reaction``, so it is claimed, leased, retried
with backoff and recovered after a crash like any other. The pipelines a reaction starts get
uuids derived from the task, so a reaction run again after a crash starts nothing twice.
"""

from __future__ import annotations

import inspect
import logging
import uuid as uuid_module
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, TypeVar

from prorch.engine.extension import Extension, Host
from prorch.model.definition import PipelineDefinition
from prorch.model.exceptions import RegistrationError
from prorch.model.mixins import HookResult, OnContinueMixin
from prorch.model.records import EventRecord, Record
from prorch.model.registry import Registry, current_registry
from prorch.model.status import EventType
from prorch.model.step import Step
from prorch.storage.creation import build_records

logger = logging.getLogger("prorch.features.reactions")
REACTION_PIPELINE = "prorch.Reaction"
REACTION_STEP = "prorch.RunReaction"
NAMESPACE = uuid_module.UUID("6f0b3f55-3c1e-4c56-9a55-7a2e3f0d1c42")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Reaction:
    name: str
    func: Callable[..., Any]
    event_type: EventType
    pipeline: str | None
    step: str | None

    def matches(self, pipeline_name: str, event: EventRecord) -> bool:
        return (
            event.type == self.event_type
            and self.pipeline in (None, pipeline_name)
            and self.step in (None, event.data.get("step"))
        )


def on_event(
    event_type: str | EventType,
    *,
    pipeline: str | type[PipelineDefinition] | None = None,
    step: str | type[Step] | None = None,
    name: str | None = None,
    registry: Registry | None = None,
) -> Callable[[F], F]:
    """Decorator: call ``func(event, ctx)`` once for each stored event of ``event_type`` (of
    ``pipeline`` / ``step`` when given). ``ctx.start(PipelineClass, params)`` starts a pipeline
    exactly once per event. A reaction that raises is retried with backoff and logged.
    ``registry``: where to register it (default: the global registry)."""
    try:
        kind = EventType(event_type)
    except ValueError as exc:
        known = ", ".join(e.value for e in EventType)
        raise RegistrationError(f"unknown event type {event_type!r}; one of: {known}") from exc
    pipeline_name = pipeline if isinstance(pipeline, str) or pipeline is None else pipeline.name
    step_name = step if isinstance(step, str) or step is None else step.name

    def decorate(func: F) -> F:
        try:
            inspect.signature(func).bind(object(), object())
        except TypeError as exc:
            raise RegistrationError(f"reaction {func.__qualname__} must take (event, ctx): {exc}") from exc
        reaction_name = name or f"{func.__module__}.{func.__qualname__}"
        install(registry or current_registry()).add(Reaction(reaction_name, func, kind, pipeline_name, step_name))
        return func

    return decorate


def install(registry: Registry) -> ReactionBook:
    """Give ``registry`` the reactions feature, once: its book of reactions (called by the
    ``prorch.features.Reactions`` extension with each transition's events, it adds a reaction task
    to the commit of each event that triggers one) and the internal ``prorch.Reaction`` pipeline
    that runs those tasks. Returns the registry's book."""
    found = book_of(registry)
    if found is not None:
        return found
    book = ReactionBook(registry)
    registry.add_step(book.step)
    registry.add_pipeline(book.pipeline)
    registry.extensions.append(book)  # with the registry: its orchestrators and pipeline creation
    return book


def book_of(registry: Registry) -> ReactionBook | None:
    """The registry's book of reactions, when the feature is installed."""
    versions = registry.steps.get(REACTION_STEP, {})
    step = next(iter(versions.values()), None)
    return step.reactions if step is not None and issubclass(step, RunReaction) else None


def reactions_of(registry: Registry) -> list[Reaction]:
    """The reactions registered on ``registry`` (none when the feature is not installed)."""
    book = book_of(registry)
    return list(book.reactions) if book is not None else []


class ReactionBook(Extension):
    """One registry's reactions, the extension that turns matching events into reaction tasks,
    and the task pipeline's classes, bound to this book."""

    name = "reactions"

    def __init__(self, registry: Registry) -> None:
        self.reactions: list[Reaction] = []
        self.registry = registry
        book = self

        class BoundRunReaction(RunReaction):
            reactions = book

        class ReactionPipeline(PipelineDefinition):
            """A reaction task: one event, one reaction."""

            name = REACTION_PIPELINE
            steps = [BoundRunReaction]

        self.step: type[RunReaction] = BoundRunReaction
        self.pipeline: type[PipelineDefinition] = ReactionPipeline

    def add(self, reaction: Reaction) -> None:
        """Register a reaction (an orchestrator built before it sees it: they share the book)."""
        existing = self.find(reaction.name)
        if existing is not None:
            self.reactions.remove(existing)  # a module imported again re-registers it
        self.reactions.append(reaction)

    def find(self, name: str) -> Reaction | None:
        return next((r for r in self.reactions if r.name == name), None)

    def on_transition(self, pipeline_name: str, events: Sequence[EventRecord], now: datetime) -> list[Record]:
        """The task records (pipeline, step, created event) for the reactions these events trigger."""
        if not self.reactions or pipeline_name == REACTION_PIPELINE:
            return []
        tasks: list[Record] = []
        for event in events:
            for reaction in self.reactions:
                if reaction.matches(pipeline_name, event):
                    params = {"reaction": reaction.name, "pipeline": pipeline_name, "event": event.to_dict()}
                    task_uuid = str(uuid_module.uuid5(NAMESPACE, f"{event.uuid}/{reaction.name}"))
                    tasks.extend(build_records(self.pipeline, params, now=now, uuid=task_uuid))
        return tasks


class ReactionContext:
    """What a reaction gets besides the event: a way to start pipelines exactly once."""

    def __init__(self, step: RunReaction) -> None:
        self._step = step
        self.started: list[str] = []

    @property
    def pipeline(self) -> str:
        """The name of the pipeline the event belongs to."""
        return str(self._step.params["pipeline"])

    def start(self, pipeline: type[PipelineDefinition] | str, params: Any = None, **options: Any) -> str:
        """Create a pipeline (pending, due now) and return its uuid; on a re-run of this
        reaction, the same call returns the same uuid and creates nothing."""
        derived = str(uuid_module.uuid5(NAMESPACE, f"{self._step.pipeline_uuid}/{len(self.started)}"))
        self._step._require_runtime("start").create_pipeline(pipeline, params, derived, options)
        self.started.append(derived)
        return derived


class RunReaction(OnContinueMixin, Step):
    """The one step of a reaction task: call the reaction function. ``install`` registers a
    subclass bound to its registry's book."""

    name = REACTION_STEP
    max_attempts = 5
    reactions: ClassVar[ReactionBook]

    def on_continue(self) -> HookResult:
        reaction = self.reactions.find(self.params["reaction"])
        if reaction is None:  # not deployed on this worker: wait for one that has it, never fail
            logger.warning("reaction %s is not registered here; trying again in 60s", self.params["reaction"])
            self.wait(seconds=60)
            return None
        ctx = ReactionContext(self)
        result = reaction.func(EventRecord.from_dict(self.params["event"]), ctx)
        if inspect.isawaitable(result):  # an ``async def`` reaction: the worker awaits it on its loop
            return self._finish_after(result, reaction.name, ctx)
        self.finish({"reaction": reaction.name, "started": ctx.started})
        return None

    async def _finish_after(self, awaited: Awaitable[Any], name: str, ctx: ReactionContext) -> None:
        await awaited
        self.finish({"reaction": name, "started": ctx.started})


def reactions_for(host: Host) -> Extension:
    """The built-in's factory: the host's registry's book, installed once (the same object
    goes with the registry into pipeline creation)."""
    return install(host.registry)
