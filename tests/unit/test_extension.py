"""The Extension protocol (``prorch.engine.extension``): each hook reaches the extensions that
implement it, an extension's error is logged with its name and never stops the pass, and the
documented audit-log example works on a real SQLite file."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import prorch
from docs.examples.audit_log import AuditLog, Payment
from prorch import Extension, Orchestrator, PassSummary
from prorch.engine.extension import Extensions, PassReport
from prorch.features import Children, Limits, Schedules
from prorch.model.limit_rules import ClaimLimit
from prorch.model.records import EventRecord, PipelineRecord, Record, StepRecord
from prorch.model.registry import Registry
from prorch.model.status import Status
from prorch.testing import Harness
from tests.support.builders import pipeline_of, step_of


class Recorder(Extension):
    """Implements every hook and writes down each call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")

    def claim_limits(self) -> Mapping[str, ClaimLimit]:
        self.calls.append("claim_limits")
        return {}

    @contextlib.contextmanager
    def around_pass(self) -> Iterator[None]:
        self.calls.append("around_pass")
        yield

    def on_pass_start(self, summary: PassReport) -> None:
        self.calls.append("on_pass_start")

    @contextlib.contextmanager
    def around_hook(self, pipeline: PipelineRecord, step: StepRecord, hook: str) -> Iterator[None]:
        self.calls.append(f"around_hook {step.name}.{hook}")
        yield

    def on_hook_end(self, pipeline_name: str, step_name: str, hook: str, seconds: float) -> None:
        self.calls.append(f"on_hook_end {step_name}.{hook}")

    def on_transition(self, pipeline_name: str, events: Sequence[EventRecord], now: datetime) -> list[Record]:
        self.calls.extend(f"on_transition {event.type.value}" for event in events)
        return []

    def on_ended(self, pipeline: PipelineRecord, status: Status) -> None:
        self.calls.append(f"on_ended {status.value}")

    def on_pass_end(self, summary: PassReport, lags: Sequence[float], seconds: float) -> None:
        self.calls.append(f"on_pass_end claimed={summary.claimed}")


class Broken(Extension):
    """Raises in every hook that must not stop a pass."""

    name = "broken"

    def claim_limits(self) -> Mapping[str, ClaimLimit]:
        raise RuntimeError("limits broke")

    def around_pass(self) -> contextlib.AbstractContextManager[Any]:
        raise RuntimeError("pass span broke")

    @contextlib.contextmanager
    def around_hook(self, pipeline: PipelineRecord, step: StepRecord, hook: str) -> Iterator[None]:
        yield
        raise RuntimeError("hook span broke on exit")

    def on_hook_end(self, pipeline_name: str, step_name: str, hook: str, seconds: float) -> None:
        raise RuntimeError("timing broke")

    def on_ended(self, pipeline: PipelineRecord, status: Status) -> None:
        raise RuntimeError("ended broke")

    def on_pass_end(self, summary: PassReport, lags: Sequence[float], seconds: float) -> None:
        raise RuntimeError("pass end broke")


def test_each_hook_reaches_an_extension_in_the_order_of_a_pass(registry: Registry) -> None:
    flow = pipeline_of(step_of("Only", lambda self: None), name="Flow")
    recorder = Recorder()
    harness = Harness(registry=registry, extensions=[recorder])
    harness.create(flow)
    summary = harness.run_pass()
    assert summary.finished == 1
    assert recorder.calls == [
        "around_pass", "on_pass_start", "claim_limits",
        "around_hook Only.on_start", "on_hook_end Only.on_start",
        "on_transition pipeline.started", "on_transition step.started",  # the hook's transition: one commit
        "on_transition step.finished", "on_transition pipeline.finished",
        "on_ended finished", "on_pass_end claimed=1",
    ]  # fmt: skip


def test_an_extension_s_error_is_logged_with_its_name_and_the_pass_goes_on(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    flow = pipeline_of(step_of("Only", lambda self: None), name="Flow")
    after = Recorder()  # after the broken one: still called
    harness = Harness(registry=registry, extensions=[Broken(), after])
    uuid = harness.create(flow).uuid
    with caplog.at_level(logging.ERROR, logger="prorch.engine.extension"):
        summary = harness.run_pass()
    assert summary.finished == 1 and summary.errors == {}
    assert harness.status(uuid) == "finished"
    logged = [r.getMessage() for r in caplog.records]
    for hook in ("claim_limits", "around_pass", "around_hook", "on_hook_end", "on_ended", "on_pass_end"):
        assert any(m.startswith(f"extension broken: {hook} failed") for m in logged), (hook, logged)
    assert "on_ended finished" in after.calls and "on_pass_end claimed=1" in after.calls


def test_an_extension_s_failure_at_the_pass_start_is_an_error_of_the_pass(registry: Registry) -> None:
    class Failing(Extension):
        def on_pass_start(self, summary: PassReport) -> None:
            raise ValueError("no tick today")

    flow = pipeline_of(step_of("Only", lambda self: None), name="Flow")
    harness = Harness(registry=registry, extensions=[Failing()])
    uuid = harness.create(flow).uuid
    summary = harness.run_pass()
    assert summary.errors == {"extension:Failing": "ValueError: no tick today"}
    assert harness.status(uuid) == "finished"  # the pipelines went on


def test_a_hook_nobody_implements_has_an_empty_list_and_the_built_ins_are_there(registry: Registry) -> None:
    orchestrator = Harness(registry=registry).orchestrator
    hooks = orchestrator.extensions.by_hook
    assert hooks["around_hook"] == [] and hooks["on_hook_end"] == [] and hooks["around_pass"] == []
    assert [type(e) for e in hooks["on_pass_start"]] == [Schedules]
    assert [type(e) for e in hooks["claim_limits"]] == [Limits]
    assert [type(e) for e in hooks["on_ended"]] == [Children]
    assert [e.name for e in hooks["on_transition"]] == ["reactions"]
    assert [type(e) for e in hooks["next_due"]] == [Schedules]
    extensions = Extensions([Recorder()])
    not_overridden = [hook for hook, found in extensions.by_hook.items() if not found]
    assert not_overridden == ["on_lease_lost", "next_due"]


def test_extension_is_public_and_an_extension_is_attached_once(registry: Registry) -> None:
    assert "Extension" in prorch.__all__ and prorch.Extension is Extension
    recorder = Recorder()
    orchestrator = Harness(registry=registry, extensions=[recorder, recorder]).orchestrator
    orchestrator.add_extension(recorder)
    assert [e for e in orchestrator.extensions.all if e is recorder] == [recorder]


def test_the_documented_audit_log_appends_every_transition_on_sqlite(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    orchestrator = Orchestrator(f"sqlite:///{tmp_path / 'a.db'}", extensions=[AuditLog(log)])
    uuid = Payment.create(orchestrator.store.backend, {"amount": 12}).uuid
    summary = orchestrator.execute_pipelines()
    assert isinstance(summary, PassSummary) and summary.finished == 1
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert {line["uuid"] for line in lines} == {uuid}
    assert [(line["event"], line["step"]) for line in lines] == [
        ("pipeline.started", None), ("step.started", "Charge"), ("step.finished", "Charge"),
        ("step.started", "Receipt"), ("step.finished", "Receipt"), ("pipeline.finished", None),
    ]  # fmt: skip
