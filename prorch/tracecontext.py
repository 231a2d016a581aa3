"""The trace a pipeline belongs to, kept with it (``PipelineRecord.trace``, a W3C
``traceparent`` carrier) from its creation, so that every resume, in any process, joins that
trace. With opentelemetry-api installed (``prorch[otel]``) the creator's current span is taken
when there is one, else the pipeline gets a trace of its own; without it, nothing is stored."""

from __future__ import annotations

import random
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.propagate import extract, inject
except ImportError:  # pragma: no cover - the extra is not installed
    trace = None  # type: ignore[assignment]


def enabled() -> bool:
    return trace is not None


def new_carrier() -> dict[str, str] | None:
    """The carrier to store with a new pipeline: the creator's span, or a fresh trace."""
    if trace is None:
        return None
    current = trace.get_current_span().get_span_context()
    context = None
    if not current.is_valid:
        fresh = trace.SpanContext(
            trace_id=random.getrandbits(128) or 1,
            span_id=random.getrandbits(64) or 1,
            is_remote=False,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
        context = trace.set_span_in_context(trace.NonRecordingSpan(fresh))
    carrier: dict[str, str] = {}
    inject(carrier, context=context)
    return carrier or None


def parent_context(carrier: dict[str, Any] | None) -> Any:
    """The OpenTelemetry context to start a pipeline's spans in (None: the current one)."""
    if trace is None or not isinstance(carrier, dict):
        return None
    return extract(carrier)
