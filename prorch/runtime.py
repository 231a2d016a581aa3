"""What a hook may reach beyond its own step, lent by the runner for one hook call: messages
(``receive``), plugins (``plugins``) and, for reactions, starting pipelines. Its effects join the
transition only if the hook returns without raising."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from prorch.plugins import plugins_for
from prorch.records import EventRecord, MessageRecord
from prorch.status import EventType
from prorch.step import Step

if TYPE_CHECKING:
    from prorch.runner import Run, Runner


class HookRuntime:
    """What one hook call may reach beyond its step: messages and plugins. Its effects join
    the run only if the hook returns without raising."""

    def __init__(self, runner: Runner, run: Run, now: datetime) -> None:
        self.runner = runner
        self.registry = runner.registry
        self.run = run
        self.now = now
        self.consumed: list[MessageRecord] = []
        self.events: list[EventRecord] = []

    def receive(self, step: Step, name: str) -> Any:
        taken = {m.uuid for m in self.run.consumed} | {m.uuid for m in self.consumed}
        for message in self.runner.store.messages_of(self.run.pipeline.uuid):
            if message.name == name and message.consumed_at is None and message.uuid not in taken:
                message.consumed_at = self.now
                self.consumed.append(message)
                record = next(s for s in self.run.steps if s.uuid == step.uuid)
                self.events.append(
                    self.runner.make_event(
                        self.run, EventType.MESSAGE_RECEIVED, record, self.now, name=name, message=message.uuid
                    )
                )
                return message.payload
        return None

    def plugins(self, step: Step, point: str, kwargs: dict[str, Any]) -> list[Any]:
        found = plugins_for(self.runner.registry.plugins, step.name or "", point, step.tenant)
        return [plugin.func(step, **kwargs) for plugin in found]

    def create_pipeline(self, pipeline: Any, params: Any, uuid: str, options: dict[str, Any]) -> None:
        """Create a pipeline with a given uuid, once (for reactions)."""
        cls = self.registry.pipeline(pipeline) if isinstance(pipeline, str) else pipeline
        cls.create(
            self.runner.store.backend, params, uuid=uuid, clock=self.runner.clock, registry=self.registry, **options
        )

    def merge(self) -> None:
        self.run.consumed.extend(self.consumed)
        self.run.events.extend(self.events)
