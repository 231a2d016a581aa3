"""Replay: check the recorded pipelines of a store (or of a file ``prorch export`` wrote)
against the code loaded now, and report, per pipeline, the first step that this code would not
run as it was recorded: a class that no longer loads, a step that is gone or moved, params that
no longer validate, a finished step's output that its ``Output`` model now refuses, a patch the
pipeline carries that the code no longer declares (or one it deprecates that the pipeline predates).

Unlike Temporal's replayer, this runs no hook. A prorch hook is not a deterministic function
replayed from the history: it runs once per attempt, with side effects, and its verdict is
stored; the engine never runs a finished step again. What a deploy can break is the meeting
of stored records with the new code at the next claim, and that is what is checked, with the
same look-ups the worker makes (the registry by name and version, ``Params``, ``Output``, the
patch rules). Nothing is written: the source store is only read."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from prorch.model import patches as patch_rules
from prorch.model.definition import PipelineDefinition
from prorch.model.exceptions import InvalidParamsError, NotRegisteredError, PipelineNotFoundError, ProrchError
from prorch.model.records import EventRecord, JSONDict, PipelineRecord, RecordError, StepRecord
from prorch.model.registry import Registry
from prorch.model.status import TERMINAL, Status
from prorch.storage.repository import PipelineQuery
from prorch.storage.store import Store

EXPORT_FORMAT = "prorch-export/1"
"""The ``format`` of a file ``prorch export`` writes."""
PAGE = 500


@dataclass(frozen=True)
class History:
    """One recorded pipeline: its record, its steps in order, and its events (when exported)."""

    pipeline: PipelineRecord
    steps: list[StepRecord]
    events: list[EventRecord] = field(default_factory=list)


@dataclass(frozen=True)
class Finding:
    """The first thing about one pipeline that the code loaded now would not run as recorded."""

    uuid: str
    name: str
    version: int
    status: str
    step: str | None  # the step's name, or None: the pipeline itself (its class, params, patches)
    kind: str  # "class", "patches", "params", "step", "steps", "output"
    message: str

    def to_json(self) -> JSONDict:
        return {
            "uuid": self.uuid, "name": self.name, "version": self.version, "status": self.status,
            "step": self.step, "kind": self.kind, "message": self.message,
        }  # fmt: skip

    def line(self) -> str:
        where = f"step {self.step}" if self.step is not None else "pipeline"
        return f"{self.uuid} {self.name} v{self.version} ({self.status}), {where}: {self.kind}: {self.message}"


@dataclass
class ReplayReport:
    """What ``replay`` checked and found; ``ok`` when every pipeline fits the code."""

    checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> JSONDict:
        return {"checked": self.checked, "ok": self.ok, "findings": [f.to_json() for f in self.findings]}

    def text(self) -> str:
        lines = [f.line() for f in self.findings]
        verdict = "ok" if self.ok else f"{len(self.findings)} would not run as recorded"
        lines.append(f"replayed {self.checked} pipeline(s) against the code loaded: {verdict}")
        return "\n".join(lines)


def replay(histories: Iterable[History], registry: Registry) -> ReplayReport:
    """Check each history against ``registry`` (see the module's docstring); runs no hook."""
    report = ReplayReport()
    for history in histories:
        report.checked += 1
        finding = first_divergence(history, registry)
        if finding is not None:
            report.findings.append(finding)
    return report


def first_divergence(history: History, registry: Registry) -> Finding | None:
    """The first problem of one pipeline, pipeline-level before its steps in order; None if none."""
    record = history.pipeline

    def found(step: str | None, kind: str, message: str) -> Finding:
        return Finding(record.uuid, record.name, record.version, record.status.value, step, kind, message)

    try:
        cls = registry.pipeline(record.name, record.version)
    except NotRegisteredError as exc:
        return found(None, "class", str(exc))
    if record.status not in TERMINAL:  # an ended pipeline's patches decide nothing any more
        reason = patch_rules.mismatch(cls, record)
        if reason is not None:
            return found(None, "patches", reason)
    try:
        cls.validate_params(record.params)
    except InvalidParamsError as exc:
        return found(None, "params", f"{exc} (as stored: {json.dumps(record.params, sort_keys=True)[:300]})")
    order = {step_cls.name: index for index, step_cls in enumerate(cls.steps)}
    steps = sorted(  # as the worker orders them (a prorch 1.0.1 step has no position)
        history.steps, key=lambda s: s.position if s.position is not None else order.get(s.name, len(order))
    )
    for index, step in enumerate(steps):
        problem = _step_problem(cls, registry, index, step)
        if problem is not None:
            return found(step.name, *problem)
    if len(cls.steps) > len(steps):
        added = cls.steps[len(steps)]
        return found(
            added.name, "steps",
            f"the class now lists step {added.name} v{added.version} after the pipeline's last recorded step; "
            "this pipeline has no record of it and would never run it (add steps in a new version)",
        )  # fmt: skip
    return None


def _step_problem(
    cls: type[PipelineDefinition], registry: Registry, index: int, step: StepRecord
) -> tuple[str, str] | None:
    try:
        step_cls = registry.step(step.name, step.version)
    except NotRegisteredError as exc:
        return "step", f"recorded step {step.name} v{step.version} no longer loads: {exc}"
    listed = [(s.name, s.version) for s in cls.steps]
    if index >= len(listed) or listed[index] != (step.name, step.version):
        shown = ", ".join(f"{name} v{version}" for name, version in listed)
        return "steps", (
            f"recorded step #{index + 1} is {step.name} v{step.version}, but {cls.name} v{cls.version} now "
            f"lists: {shown} (change a pipeline's steps in a new version)"
        )
    if step.status == Status.FINISHED and step_cls.Output is not None:
        return _output_problem(step_cls.Output, step)
    return None


def _output_problem(model: type[BaseModel], step: StepRecord) -> tuple[str, str] | None:
    """A later step or the pipeline's result reads this output through the model."""
    try:
        model.model_validate(step.output)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'output'}: {e['msg']}" for e in exc.errors())
        return "output", f"the stored output no longer validates against {model.__name__}: {problems}"
    return None


# --- sources -------------------------------------------------------------------------------


def from_store(store: Store, *, include_ended: bool = False, uuids: Sequence[str] | None = None) -> Iterator[History]:
    """The store's pipelines (the live ones unless ``include_ended``, or those of ``uuids``),
    a page at a time, each with its steps in order."""
    if uuids is not None:
        for uuid in uuids:
            record = store.get_pipeline(uuid)
            if record is None:
                raise PipelineNotFoundError(f"no pipeline {uuid} is stored", uuid=uuid)
            yield History(record, _ordered(store.steps_of(uuid)), store.events_of(uuid))
        return
    after: str | None = None
    while True:
        page = store.query_pipelines(PipelineQuery(limit=PAGE), after=after)
        chosen = [r for r in page.pipelines if include_ended or r.status not in TERMINAL]
        steps = store.steps_of_many([r.uuid for r in chosen]) if chosen else {}
        for record in chosen:
            yield History(record, _ordered(steps.get(record.uuid, [])))
        if page.next_after is None:
            return
        after = page.next_after


def _ordered(steps: list[StepRecord]) -> list[StepRecord]:
    return sorted(steps, key=lambda s: (s.position is None, s.position or 0))


def export(histories: Iterable[History]) -> JSONDict:
    """The JSON document ``prorch export`` writes and ``from_export`` reads."""
    return {
        "format": EXPORT_FORMAT,
        "pipelines": [
            {"pipeline": h.pipeline.to_dict(), "steps": [s.to_dict() for s in h.steps],
             "events": [e.to_dict() for e in h.events]}
            for h in histories
        ],
    }  # fmt: skip


def from_export(path: str | Path, *, include_ended: bool = False) -> list[History]:
    """The histories of a file ``prorch export`` wrote; a clear error for anything else."""
    try:
        data: Any = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidParamsError(f"cannot read export file {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT or not isinstance(data.get("pipelines"), list):
        raise InvalidParamsError(f"{path} is not a file written by `prorch export` (format {EXPORT_FORMAT})")
    try:
        histories = [
            History(
                PipelineRecord.from_dict(item["pipeline"]),
                _ordered([StepRecord.from_dict(s) for s in item.get("steps", [])]),
                [EventRecord.from_dict(e) for e in item.get("events", [])],
            )
            for item in data["pipelines"]
        ]
    except (RecordError, KeyError, TypeError, ProrchError) as exc:
        raise InvalidParamsError(f"{path}: a recorded pipeline is not valid: {exc}") from exc
    return [h for h in histories if include_ended or h.pipeline.status not in TERMINAL]
