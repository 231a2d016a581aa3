"""How commands print: tables, a pipeline's state and history, pass summaries, JSON."""

from __future__ import annotations

import json
import textwrap
from datetime import datetime
from typing import Any

import click

from prorch.display import format_seconds, format_time, step_seconds
from prorch.model.definition import PipelineDefinition
from prorch.model.records import EventRecord, PipelineRecord, StepRecord
from prorch.model.status import TERMINAL, Status
from prorch.storage.listing import PipelinePage
from prorch.summaries import PassSummary, PipelineState


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def print_summary(summary: PassSummary, as_json: bool) -> None:
    if as_json:
        echo_json(summary.__dict__)
        return
    scheduled = f"scheduled {summary.scheduled}, " if summary.scheduled else ""
    click.echo(
        f"{scheduled}claimed {summary.claimed}, finished {summary.finished}, failed {summary.failed}, "
        f"cancelled {summary.cancelled}, waiting {summary.waiting}, blocked {len(summary.blocked)}, "
        f"errors {len(summary.errors)}"
    )
    for uuid, reason in summary.blocked.items():
        click.echo(f"  blocked {uuid}: {reason}")
    for uuid, reason in summary.errors.items():
        click.echo(f"  error {uuid}: {reason}")


def next_run(record: PipelineRecord) -> str:
    return format_time(record.next_run_at) if record.status not in TERMINAL else "-"


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def print_page(
    page: PipelinePage, states: dict[str, str], blocked: dict[str, str] | None = None,
    held: dict[str, str] | None = None,
    progress: dict[str, str] | None = None,
) -> None:  # fmt: skip
    """``prorch list``; ``states`` maps each uuid to its state (``display.state_text``),
    ``blocked`` the uuid of a pipeline no worker can run to why, ``held`` one a pause or a
    limit holds to which (its next run is then not "now"), ``progress`` one whose current step
    reported progress to it (a PROGRESS column, when any did)."""
    blocked, held, progress = blocked or {}, held or {}, progress or {}
    rows = [["UUID", "STATE", "NAME", "VERSION", "CREATED", "NEXT RUN", *(["PROGRESS"] if progress else [])]]
    rows += [
        [r.uuid, states[r.uuid], r.name, str(r.version), format_time(r.created_at),
         f"blocked: {blocked[r.uuid]}" if r.uuid in blocked else held.get(r.uuid) or next_run(r),
         *([progress.get(r.uuid, "")] if progress else [])]
        for r in page.pipelines
    ]  # fmt: skip
    print_table(rows)
    shown = len(page.pipelines)
    click.echo(f"{shown} shown of {page.total} matching" if page.total is not None else f"{shown} shown")
    if page.next_after is not None:
        click.echo(f"next page: --after {page.next_after}")


def progress_text(progress: dict[str, Any] | None) -> str:
    if not progress:
        return ""
    done, total = float(progress.get("done") or 0), progress.get("total")
    text = f"{done:g}/{float(total):g} ({100 * done / float(total):.0f}%)" if total else f"{done:g}"
    return text + (f" {progress['note']}" if progress.get("note") else "")


def print_state(
    state: PipelineState,
    history: list[EventRecord],
    now: datetime,
    max_attempts: dict[str, int],
    tracebacks: bool = True,
    holder: str | None = None,
    current: str | None = None,
    held: str | None = None,
    logs: bool = False,
) -> None:
    """``prorch show``: everything an operator asks about one pipeline, times with their zone.
    ``max_attempts`` maps a step name to its limit when its code is loaded here; ``tracebacks``:
    print a failed step's traceback under its error; ``holder``: which worker runs it;
    ``current``: its state, when it says more than its status (running, due, waiting...);
    ``held``: what holds it (a pause, a limit), said instead of its next run's reason;
    ``logs``: each step's logs, by attempt."""
    _print_pipeline(state, history, now, holder, current, held)
    click.echo("steps:")
    for s in state.steps:
        _print_step(s, max_attempts.get(s.name), now, state.pipeline.updated_at, tracebacks)
        if logs:
            for line in log_lines(s.logs):
                click.echo(f"       {line}")
    if state.children:
        click.echo("children:")
        for child in state.children:
            click.echo(f"  {child.uuid}  {child.name}  {child.status.value}")
    print_history(history)


def _print_pipeline(
    state: PipelineState, history: list[EventRecord], now: datetime, holder: str | None, current: str | None,
    held: str | None = None,
) -> None:  # fmt: skip
    """The pipeline's own lines of ``prorch show``, above its steps."""
    p = state.pipeline
    shown = p.status.value if current in (None, p.status.value) else f"{p.status.value} ({current})"
    click.echo(f"{p.name} v{p.version}  {p.uuid}  {shown}")
    tenant = p.context.get("tenant")
    for label, value in (("key", p.key), ("tenant", tenant), ("priority", p.priority or None)):
        if value is not None:
            click.echo(f"  {label}: {value}")
    click.echo(f"  created: {format_time(p.created_at)}   updated: {format_time(p.updated_at)}")
    if p.parent_uuid:
        click.echo(f"  parent: {p.parent_uuid}")
    moment, reason = state.next_run(now, history)
    reason = held or reason
    click.echo(f"  next run: {format_time(moment) if moment is not None else '-'} ({reason})")
    if holder is not None and holder != held:
        click.echo(f"  {holder}")
    click.echo(f"  params: {json.dumps(p.params, sort_keys=True)}")
    if p.attributes:
        click.echo(f"  attributes: {', '.join(f'{k}={v}' for k, v in sorted(p.attributes.items()))}")
    context = {k: v for k, v in p.context.items() if k != "tenant"}
    if context:
        click.echo(f"  context: {json.dumps(context, sort_keys=True)}")
    metadata = {k: v for k, v in p.metadata.items() if k != "current_step"}
    if metadata:
        click.echo(f"  metadata: {json.dumps(metadata, sort_keys=True)}")
    if state.blocked:
        click.echo(f"  BLOCKED: {state.blocked}")
    elif state.code_missing:
        click.echo(f"  (its code is not loaded here: {state.code_missing})")
    if p.last_error is not None:
        click.echo(f"  last error: {p.last_error.type}: {p.last_error.message}")


def _print_step(
    s: StepRecord, limit: int | None, now: datetime, last_change: datetime | None, tracebacks: bool
) -> None:
    """One step's lines of ``prorch show``; ``limit``: its max attempts, when its code is loaded."""
    attempt = f"attempt {s.attempt} of {limit}" if limit else f"attempt {s.attempt}"
    click.echo(f"  {s.position}. {s.name:<28} {s.status.value:<9} {attempt:<14} {step_times(s, now, last_change)}")
    if s.progress:
        click.echo(f"       progress: {progress_text(s.progress)}")
    if s.metadata:
        click.echo(f"       metadata: {json.dumps(s.metadata, sort_keys=True)}")
    if s.output is not None:
        click.echo(f"       output: {json.dumps(s.output, sort_keys=True)}")
    if s.error is not None:
        click.echo(f"       error: {s.error.type}: {s.error.message}")
        if tracebacks and s.error.traceback and s.status == Status.FAILED:
            click.echo(textwrap.indent(s.error.traceback.rstrip(), "         "))
    if s.rollback:
        click.echo(f"       rollback: {s.rollback}")


def log_lines(logs: list[dict[str, Any]] | None) -> list[str]:
    """A step's logs as ``prorch show --logs`` prints them: attempt by attempt, its lines, then
    how many were dropped past the cap, and whether an operator's retry followed; the lines of
    ``on_rollback``, ``on_cancel`` and ``on_timeout`` name their hook."""
    printed: list[str] = []
    for entry in logs or []:
        retried = " (then retried by an operator)" if entry.get("retried") else ""
        hook = f"{entry['hook']}, " if entry.get("hook") else ""
        printed.append(f"logs of {hook}attempt {entry.get('attempt')}{retried}:")
        for at, level, message in entry.get("lines", []):
            printed.append(f"  {at[11:23]} {level:<7} {message}")
        if entry.get("dropped"):
            printed.append(f"  ({entry['dropped']} lines dropped: step_log_lines caps an attempt)")
    return printed


def step_times(step: StepRecord, now: datetime, last_change: datetime | None) -> str:
    """How long a step took, or, while it waits (a hook called ``wait()``), since when (the
    pipeline's last transition stored the wait): its time so far is no duration of work."""
    if step.status == Status.PENDING and step.next_run_at is not None and step.next_run_at > now:
        return f"waiting since {format_time(last_change)}, started {format_time(step.started_at)}"
    return f"took {format_seconds(step_seconds(step, now)):<8} started {format_time(step.started_at)}"


def print_history(history: list[EventRecord]) -> None:
    click.echo("history:")
    for event in history:
        step = f" {event.data['step']}" if "step" in event.data else ""
        click.echo(f"  {event.at:%Y-%m-%d %H:%M:%S.%f %Z}  {event.type.value}{step}{_who(event.data)}")


def _who(data: dict[str, Any]) -> str:
    """`` by ACTOR: REASON`` for an operator's action (cancel, retry, rerun), else nothing."""
    actor, reason = data.get("actor"), data.get("reason")
    if actor is None and reason is None:
        return ""
    return f" by {actor or 'someone'}" + (f": {reason}" if reason else "")


def pipeline_schema(pipeline_cls: type[PipelineDefinition]) -> dict[str, Any]:
    any_object = {"type": "object"}
    return {
        "pipeline": pipeline_cls.name,
        "version": pipeline_cls.version,
        "params": pipeline_cls.Params.model_json_schema() if pipeline_cls.Params else any_object,
        "steps": {step.name: step.Output.model_json_schema() if step.Output else None for step in pipeline_cls.steps},
    }
