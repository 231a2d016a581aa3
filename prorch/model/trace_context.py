"""The trace a pipeline belongs to, kept with it (``PipelineRecord.trace``, a W3C
``traceparent`` carrier) from its creation, so that every resume, in any process, joins that
trace. With opentelemetry-api installed (``prorch[otel]``) the creator's current span is taken
when there is one, else the pipeline gets a trace of its own; without it, nothing is stored."""

from __future__ import annotations

import functools
import random
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.propagate import extract, inject
except ImportError:  # pragma: no cover - the extra is not installed
    trace = None  # type: ignore[assignment]


def sdk_configured() -> bool:
    """opentelemetry-api is installed and the app has set a tracer provider (an SDK's): spans
    would be recorded. Before that, the API's global provider is a proxy."""
    return trace is not None and not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


@functools.cache
def tracer() -> Any:
    """prorch's tracer, got once: the SDK makes a new one, with its scope, on every call. Only
    called once an SDK provider is set (a proxy's tracer would be kept otherwise)."""
    assert trace is not None
    return trace.get_tracer("prorch")


def new_carrier(name: str | None = None) -> dict[str, str] | None:
    """The carrier to store with a new pipeline named ``name``. Where the app has set an SDK
    tracer provider, a ``prorch.create`` span (a child of the creator's current span, or a
    root): its trace is the pipeline's, and the SDK's sampler decides once, here, whether the
    pipeline's spans are recorded, in every process (ParentBased samplers follow it). Without
    an SDK here: the creator's current span, else a fresh trace, marked sampled."""
    if trace is None:
        return None
    context = None
    if sdk_configured():
        span = tracer().start_span(f"prorch.create {name or ''}".rstrip())
        span.end()
        context = trace.set_span_in_context(span)
    elif not trace.get_current_span().get_span_context().is_valid:
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
    if carrier.keys() == {"traceparent"} and isinstance(carrier["traceparent"], str):
        return _extracted(carrier["traceparent"])  # what prorch stores: each of its hooks reads it
    return extract(carrier)


@functools.lru_cache(maxsize=4096)
def _extracted(traceparent: str) -> Any:
    """Contexts are immutable, so the hooks of one pipeline share the one read of its carrier."""
    return extract({"traceparent": traceparent})
