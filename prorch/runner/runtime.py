"""What a hook may reach beyond its own step, lent for one hook call: messages (``receive``),
plugins (``plugins``) and, for reactions, starting pipelines. Its effects join the transition
only if the hook returns without raising."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prorch.clock import Clock
from prorch.creation import create_pipelines
from prorch.definition import PipelineDefinition
from prorch.records import EventRecord, MessageRecord
from prorch.registry import Registry
from prorch.runner.state import Run
from prorch.runner.transitions import new_event
from prorch.status import EventType
from prorch.step import Step
from prorch.store import Store


class HookRuntime:
    """What one hook call may reach beyond its step: messages, plugins, creating pipelines.
    Implements ``prorch.step.StepRuntime``."""

    def __init__(self, store: Store, registry: Registry, clock: Clock, run: Run, now: datetime) -> None:
        self.store = store
        self.registry = registry
        self.clock = clock
        self.run = run
        self.now = now
        self.consumed: list[MessageRecord] = []
        self.events: list[EventRecord] = []

    def receive(self, step: Step, name: str) -> Any:
        taken = {m.uuid for m in self.run.consumed} | {m.uuid for m in self.consumed}
        for message in self.store.messages_of(self.run.pipeline.uuid):
            if message.name == name and message.consumed_at is None and message.uuid not in taken:
                message.consumed_at = self.now
                self.consumed.append(message)
                record = next(s for s in self.run.steps if s.uuid == step.uuid)
                event = new_event(
                    self.run, EventType.MESSAGE_RECEIVED, record, self.now, name=name, message=message.uuid
                )
                self.events.append(event)
                return message.payload
        return None

    def plugins(self, step: Step, point: str, kwargs: dict[str, Any]) -> list[Any]:
        found = self.registry.plugins_for(step.name or "", point, step.tenant)
        return [plugin.func(step, **kwargs) for plugin in found]

    def create_pipeline(self, pipeline: Any, params: Any, uuid: str, options: dict[str, Any]) -> None:
        """Create a pipeline with a given uuid, once (for reactions). ``options``: ``tenant``,
        ``context``, ``priority`` and ``version``, as ``Pipeline.create`` takes them."""
        version = options.pop("version", None)
        definition: type[PipelineDefinition] = (
            pipeline if isinstance(pipeline, type) else self.registry.pipeline(pipeline)
        )
        if version is not None and version != definition.version:
            definition = self.registry.pipeline(definition.name or "", version)
        create_pipelines(
            self.store, definition, [params], [None], registry=self.registry, clock=self.clock, uuid=uuid, **options
        )

    def merge(self) -> None:
        """The hook returned: its effects join the run's next transition."""
        self.run.consumed.extend(self.consumed)
        self.run.events.extend(self.events)
