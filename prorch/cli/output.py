"""How commands print: tables, a pipeline's state and history, pass summaries, JSON."""

from __future__ import annotations

import json
from typing import Any

import click

from prorch.definition import PipelineDefinition
from prorch.records import EventRecord, PipelineRecord
from prorch.status import TERMINAL
from prorch.summaries import PassSummary, PipelineState


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def print_summary(summary: PassSummary, as_json: bool) -> None:
    if as_json:
        echo_json(summary.__dict__)
        return
    click.echo(
        f"claimed {summary.claimed}, finished {summary.finished}, failed {summary.failed}, "
        f"cancelled {summary.cancelled}, waiting {summary.waiting}, blocked {len(summary.blocked)}, "
        f"errors {len(summary.errors)}"
    )
    for uuid, reason in summary.blocked.items():
        click.echo(f"  blocked {uuid}: {reason}")
    for uuid, reason in summary.errors.items():
        click.echo(f"  error {uuid}: {reason}")


def when(moment: Any) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else "-"


def next_run(record: PipelineRecord) -> str:
    return when(record.next_run_at) if record.status not in TERMINAL else "-"


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def print_state(state: PipelineState) -> None:
    p = state.pipeline
    click.echo(f"{p.name} v{p.version}  {p.uuid}  {p.status.value}")
    if p.key is not None:
        click.echo(f"  key: {p.key}")
    if p.context:
        click.echo(f"  context: {json.dumps(p.context)}")
    if state.blocked:
        click.echo(f"  BLOCKED: {state.blocked}")
    elif state.code_missing:
        click.echo(f"  (its code is not loaded here: {state.code_missing})")
    if p.last_error is not None:
        click.echo(f"  last error: {p.last_error.type}: {p.last_error.message}")
    for s in state.steps:
        line = f"  {s.position}. {s.name:<32} {s.status.value:<9}"
        if s.output is not None:
            line += f" output={json.dumps(s.output)}"
        if s.error is not None:
            line += f" error={s.error.type}: {s.error.message}"
        if s.rollback:
            line += f" rollback={s.rollback}"
        click.echo(line)


def print_history(history: list[EventRecord]) -> None:
    click.echo("history:")
    for event in history:
        step = f" {event.data['step']}" if "step" in event.data else ""
        click.echo(f"  {event.at:%Y-%m-%d %H:%M:%S.%f}  {event.type.value}{step}")


def pipeline_schema(pipeline_cls: type[PipelineDefinition]) -> dict[str, Any]:
    any_object = {"type": "object"}
    return {
        "pipeline": pipeline_cls.name,
        "version": pipeline_cls.version,
        "params": pipeline_cls.Params.model_json_schema() if pipeline_cls.Params else any_object,
        "steps": {step.name: step.Output.model_json_schema() if step.Output else None for step in pipeline_cls.steps},
    }
