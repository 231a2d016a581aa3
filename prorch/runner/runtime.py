"""What a hook may reach beyond its own step, lent for one hook call: messages (``receive``),
plugins (``plugins``), child pipelines (``start_child``, ``child_result``) and, for reactions,
starting pipelines. Its effects join the transition
only if the hook returns without raising."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from prorch.clock import Clock
from prorch.creation import create_pipelines
from prorch.definition import PipelineDefinition
from prorch.exceptions import StepUsageError
from prorch.records import EventRecord, MessageRecord
from prorch.registry import Registry
from prorch.results import CHILD_ENDED, result_of
from prorch.runner.state import Run
from prorch.runner.transitions import new_event
from prorch.status import TERMINAL, EventType
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
        message = self._consume(step, lambda m: m.name == name)
        return message.payload if message is not None else None

    def _consume(self, step: Step, wanted: Callable[[MessageRecord], bool]) -> MessageRecord | None:
        """Mark the oldest unread message ``wanted`` picks as read with this hook's transition."""
        taken = {m.uuid for m in self.run.consumed} | {m.uuid for m in self.consumed}
        for message in self.store.messages_of(self.run.pipeline.uuid):
            if message.consumed_at is None and message.uuid not in taken and wanted(message):
                message.consumed_at = self.now
                self.consumed.append(message)
                record = next(s for s in self.run.steps if s.uuid == step.uuid)
                event = new_event(
                    self.run, EventType.MESSAGE_RECEIVED, record, self.now, name=message.name, message=message.uuid
                )
                self.events.append(event)
                return message
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

    def start_child(self, step: Step, pipeline: Any, params: Any, key: str | None) -> str:
        definition: type[PipelineDefinition] = (
            pipeline if isinstance(pipeline, type) else self.registry.pipeline(pipeline)
        )
        parent = self.run.pipeline.uuid
        child_key = f"child:{parent}:{step.name}:{key if key is not None else definition.name}"
        ((record, _),) = create_pipelines(
            self.store, definition, [params], [child_key], registry=self.registry, clock=self.clock,
            tenant=step.tenant, parent_uuid=parent,
        )  # fmt: skip
        return record.uuid

    def child_result(self, step: Step, uuid: str) -> Any:
        record = self.store.get_pipeline(uuid)
        if record is None or record.parent_uuid != self.run.pipeline.uuid:
            raise StepUsageError(f"child_result({uuid!r}): no child of this pipeline has that uuid")
        result = result_of(record, self.store.steps_of(uuid), self.registry)
        if record.status in TERMINAL:  # its wake-up message is read: it wakes nothing again
            self._consume(step, lambda m: m.name == CHILD_ENDED and (m.payload or {}).get("child") == uuid)
        return result

    def merge(self) -> None:
        """The hook returned: its effects join the run's next transition."""
        self.run.consumed.extend(self.consumed)
        self.run.events.extend(self.events)
