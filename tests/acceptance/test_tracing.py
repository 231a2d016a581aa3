"""Tracing across resumes (issue #16): a pipeline created with no span of its own gets a trace
at creation; two `prorch run` processes (the SDK exporting to a file, configured by the app)
each run some of its hooks, and every hook span of both lands in that one trace, with the
pipeline's attributes; a hook's exception is recorded on its span; JSON logs carry trace_id and
span_id."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from prorch import Orchestrator

pytest.importorskip("opentelemetry.sdk")
PRORCH = str(Path(sys.executable).parent / "prorch")
APP = """
import json, logging, os
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from prorch import OnContinueMixin, OnStartMixin, Pipeline, Step, register_pipeline, register_step

class FileExporter(SpanExporter):
    def export(self, spans):
        with open(os.environ["SPANS_FILE"], "a") as out:
            for span in spans:
                out.write(json.dumps({
                    "name": span.name, "trace_id": format(span.context.trace_id, "032x"), "pid": os.getpid(),
                    "attributes": dict(span.attributes or {}), "events": [e.name for e in span.events],
                    "status": span.status.status_code.name,
                    "parent": format(span.parent.span_id, "016x") if span.parent else None,
                    "span_id": format(span.context.span_id, "016x"),
                }) + "\\n")
        return SpanExportResult.SUCCESS

from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

# SAMPLE=never: this process's sampler records nothing it starts (the creator's choice)
provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF) if os.environ.get("SAMPLE") == "never" else None)
provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
trace.set_tracer_provider(provider)

@register_step
class Fetch(OnStartMixin, Step):
    name = "Fetch"
    max_attempts = 2
    retry_delay = 0

    def on_start(self):
        if self.attempt == 1:
            raise RuntimeError("flaky fetch")
        logging.getLogger("shop").warning("fetched")

@register_step
class Settle(OnStartMixin, OnContinueMixin, Step):
    name = "Settle"

    def on_start(self):
        pass

    def on_continue(self):
        if self.params.get("second_run"):
            self.finish({"ok": True})
        else:
            self.wait(seconds=0)

@register_pipeline
class Order(Pipeline):
    name = "Order"
    steps = [Fetch, Settle]
"""


def spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_pipeline_is_one_trace_across_processes(tmp_path: Path) -> None:
    (tmp_path / "traced.py").write_text(APP)
    url = f"sqlite:///{tmp_path / 'traced.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    env["SPANS_FILE"] = str(tmp_path / "spans.jsonl")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [PRORCH, "-r", url, "--app", "traced", "--log-format", "json", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done

    uuid = run("start", "Order").stdout.strip()
    stored = Orchestrator(url).store.get_pipeline(uuid)
    assert stored is not None and stored.trace is not None
    trace_id = stored.trace["traceparent"].split("-")[1]
    first = run("run")  # Fetch fails once (retry_delay 0: due again at once)
    second = run("run")  # Fetch's retry, then Settle starts and waits
    hooks = [s for s in spans(tmp_path / "spans.jsonl") if s["name"].startswith("prorch.hook")]
    assert {s["pid"] for s in hooks} != set() and len({s["pid"] for s in hooks}) == 2  # two processes
    assert {s["trace_id"] for s in hooks} == {trace_id}  # ... and one trace
    failed = [s for s in hooks if s["status"] == "ERROR"]
    assert [s["name"] for s in failed] == ["prorch.hook Fetch.on_start"] and "exception" in failed[0]["events"]
    created = [s for s in spans(tmp_path / "spans.jsonl") if s["name"] == "prorch.create Order"]
    assert [s["trace_id"] for s in created] == [trace_id]  # the creation is the trace's root span
    assert created[0]["parent"] is None and {s["parent"] for s in hooks} == {created[0]["span_id"]}
    attributes = hooks[-1]["attributes"]
    assert attributes["prorch.pipeline.uuid"] == uuid and attributes["prorch.pipeline.name"] == "Order"
    assert {"prorch.model.step", "prorch.attempt", "prorch.pipeline.version", "prorch.hook"} <= attributes.keys()
    passes = [s for s in spans(tmp_path / "spans.jsonl") if s["name"] == "prorch.pass"]
    assert any("step.retrying" in s["events"] for s in passes)  # transitions are span events
    logged = [json.loads(line) for line in (first.stderr + second.stderr).splitlines() if line.startswith("{")]
    fetched = [entry for entry in logged if entry["message"] == "fetched"]
    assert fetched and fetched[0]["trace_id"] == trace_id and len(fetched[0]["span_id"]) == 16


def test_the_creators_sampler_decides_for_every_worker(tmp_path: Path) -> None:
    """A pipeline created unsampled (the creator's sampler dropped its ``prorch.create`` span)
    records no hook span in a worker whose own sampler would record everything, as a
    ParentBased sampler follows its stored parent: one decision per pipeline, at creation."""
    (tmp_path / "traced.py").write_text(APP)
    url = f"sqlite:///{tmp_path / 'traced.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    env["SPANS_FILE"] = str(tmp_path / "spans.jsonl")

    def run(*args: str, **extra: str) -> str:
        done = subprocess.run(
            [PRORCH, "-r", url, "--app", "traced", *args],
            cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    dropped = run("start", "Order", SAMPLE="never")
    kept = run("start", "Order")
    run("run")
    hooks = [s for s in spans(tmp_path / "spans.jsonl") if s["name"].startswith("prorch.hook")]
    owners = {s["attributes"]["prorch.pipeline.uuid"] for s in hooks}
    assert owners == {kept} and dropped not in owners
    stored = Orchestrator(url).store.get_pipeline(dropped)
    assert stored is not None and stored.trace is not None
    assert int(stored.trace["traceparent"].rsplit("-", 1)[1], 16) & 1 == 0  # stored as not sampled
