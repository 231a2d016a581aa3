"""Tracing as an extension (``prorch.tracing``): a span per pass and per hook call, each
transition's events on the current span. Present only where the app configured an
OpenTelemetry SDK before creating the orchestrator, so that otherwise a hook call pays nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from prorch import tracecontext, tracing
from prorch.extension import Extension, Host
from prorch.records import EventRecord, PipelineRecord, Record, StepRecord


class Tracing(Extension):
    """OpenTelemetry spans of passes and hook calls."""

    @classmethod
    def if_configured(cls, host: Host) -> Tracing | None:
        """The built-in's factory: an instance where an SDK is configured, else None."""
        return cls() if tracecontext.sdk_configured() else None

    def around_pass(self) -> contextlib.AbstractContextManager[Any]:
        return tracing.pass_span()

    def around_hook(
        self, pipeline: PipelineRecord, step: StepRecord, hook: str
    ) -> contextlib.AbstractContextManager[Any]:
        return tracing.hook_span(pipeline, step, hook)

    def on_transition(self, pipeline_name: str, events: Sequence[EventRecord], now: datetime) -> Sequence[Record]:
        return tracing.transition_events(pipeline_name, events, now)
