"""Logging setup for the command line: stdlib ``logging``, every record carrying the pipeline and
step uuid when it has them (and the trace and span ids when tracing is active), as text or as
one JSON object per line for log shippers."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

CONTEXT_FIELDS = ("pipeline_uuid", "step_uuid")
TRACE_FIELDS = ("trace_id", "span_id")

try:
    from opentelemetry import trace as otel_trace
except ImportError:  # pragma: no cover - prorch[otel] is not installed
    otel_trace = None  # type: ignore[assignment]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [pipeline=%(pipeline_uuid)s step=%(step_uuid)s] %(message)s"


class ContextFilter(logging.Filter):
    """Gives every record the context fields, ``-`` when it has none, so formats never fail."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, "-")
        if otel_trace is not None and not hasattr(record, "trace_id"):
            span = otel_trace.get_current_span().get_span_context()
            if span.is_valid:  # tracing is active: the record joins the span it was logged in
                record.trace_id = f"{span.trace_id:032x}"
                record.span_id = f"{span.span_id:016x}"
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "at": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS + TRACE_FIELDS:
            value = getattr(record, name, "-")
            if value != "-":
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send prorch's logs (and the app's) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Alembic narrates every migration at INFO; prorch logs one line per upgrade itself.
    logging.getLogger("alembic").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
