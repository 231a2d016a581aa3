"""OpenTelemetry spans (with ``prorch[otel]``; opentelemetry-api only, the app configures the
SDK): each pass is a span, each hook call a span in the pipeline's own trace (the one it was
created in, ``prorch.model.trace_context``), so that every resume, in any process, joins it; the
transitions a pass writes are span events; a hook's exception is recorded on its span. Without
the API installed, nothing here runs. ``prorch.features.Tracing`` attaches these to an orchestrator."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

from prorch.engine.extension import Extension, Host
from prorch.model import trace_context
from prorch.model.records import EventRecord, PipelineRecord, Record, StepRecord

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
except ImportError:  # pragma: no cover - the extra is not installed
    trace = None  # type: ignore[assignment]

SpanFactory = Callable[[], contextlib.AbstractContextManager[Any]]


tracer = trace_context.tracer


@contextlib.contextmanager
def hook_span(pipeline: PipelineRecord, step: StepRecord, hook: str) -> Iterator[None]:
    """One hook call, as a span of the pipeline's trace. A pipeline whose creation was not
    sampled records none: its stored context is made current instead (its trace id for logs,
    and for the pipelines it starts), which costs a tenth of an unrecorded span."""
    parent = trace_context.parent_context(pipeline.trace)
    if parent is not None and not trace.get_current_span(parent).get_span_context().trace_flags.sampled:
        token = otel_context.attach(parent)
        try:
            yield
        finally:
            otel_context.detach(token)
        return
    attributes = {
        "prorch.pipeline.uuid": pipeline.uuid,
        "prorch.pipeline.name": pipeline.name,
        "prorch.pipeline.version": pipeline.version,
        "prorch.model.step": step.name,
        "prorch.hook": hook,
        "prorch.attempt": max(step.attempt, 1),
    }
    tenant = pipeline.context.get("tenant")
    if tenant is not None:
        attributes["prorch.tenant"] = str(tenant)
    with tracer().start_as_current_span(f"prorch.hook {step.name}.{hook}", context=parent, attributes=attributes):
        yield


def pass_span() -> contextlib.AbstractContextManager[Any]:
    return tracer().start_as_current_span("prorch.pass")  # type: ignore[no-any-return]


def transition_events(pipeline_name: str, events: Sequence[EventRecord], now: datetime) -> list[Record]:
    """Each transition's events become events of the current span; stores nothing."""
    span = trace.get_current_span() if trace is not None else None
    if span is not None and span.is_recording():
        for event in events:  # the uuid names the pipeline (a pass span holds several)
            attributes = {"prorch.pipeline.uuid": event.pipeline_uuid}
            if "step" in event.data:
                attributes["prorch.model.step"] = str(event.data["step"])
            span.add_event(event.type.value, attributes)
    return []


class Tracing(Extension):
    """OpenTelemetry spans of passes and hook calls."""

    @classmethod
    def if_configured(cls, host: Host) -> Tracing | None:
        """The built-in's factory: an instance where an SDK is configured, else None."""
        return cls() if trace_context.sdk_configured() else None

    def around_pass(self) -> contextlib.AbstractContextManager[Any]:
        return pass_span()

    def around_hook(
        self, pipeline: PipelineRecord, step: StepRecord, hook: str
    ) -> contextlib.AbstractContextManager[Any]:
        return hook_span(pipeline, step, hook)

    def on_transition(self, pipeline_name: str, events: Sequence[EventRecord], now: datetime) -> Sequence[Record]:
        return transition_events(pipeline_name, events, now)
