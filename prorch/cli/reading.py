"""The commands that read pipelines and never change them: ``list``, ``show``, ``wait``,
``stream``, ``schema``, ``schedules``."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any

import click

from prorch.cli.helpers import (
    STATUSES,
    Context,
    parse_attributes,
    parse_param_filter,
    reported,
)
from prorch.cli.output import (
    echo_json,
    pipeline_schema,
    print_page,
    print_state,
    print_table,
    progress_text,
)
from prorch.display import format_seconds, format_time, holder_text, lease_holder, state_text, step_limits
from prorch.features.schedules import scheduled
from prorch.model import substates
from prorch.model.exceptions import (
    InvalidParamsError,
    PipelineFailedError,
    WaitTimeoutError,
)
from prorch.model.records import PipelineRecord
from prorch.model.registry import current_registry
from prorch.model.status import TERMINAL
from prorch.model.substates import STATES
from prorch.orchestrator import Orchestrator
from prorch.storage.listing import MAX_LIMIT, parse_moment


@click.command(name="list")
@click.option("--status", type=click.Choice(STATUSES), help="Only pipelines with this status.")
@click.option(
    "--state",
    type=click.Choice(STATES),
    help="Only pipelines in this state: running, due, waiting, paused, max-running or rate-limited "
    "(pending split up), or an ended status.",
)
@click.option("--name", help="Only pipelines with this name.")
@click.option("--version", "version", type=int, help="Only pipelines of this version.")
@click.option("--tenant", help="Only pipelines of this tenant.")
@click.option("--key", help="Only the pipelines created with this key.")
@click.option(
    "--param",
    "param",
    metavar="NAME=VALUE",
    help="Only pipelines whose params field NAME equals VALUE (JSON when it parses).",
)
@click.option(
    "--attr",
    "attrs",
    multiple=True,
    metavar="NAME=VALUE",
    help="Only pipelines with this search attribute (repeatable).",
)
@click.option("--since", help="Created at or after: an age (30m, 2h, 7d) or an ISO time.")
@click.option("--until", help="Created before: an age (30m, 2h, 7d) or an ISO time.")
@click.option("--limit", type=click.IntRange(1, MAX_LIMIT), default=50, show_default=True, help="Pipelines per page.")
@click.option("--after", metavar="UUID", help="The page after this pipeline (the 'next page' uuid printed last).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_pipelines(ctx: Context, status: str | None, state: str | None, name: str | None, version: int | None,
                   tenant: str | None, key: str | None, param: str | None, since: str | None, until: str | None,
                   limit: int, after: str | None, as_json: bool, attrs: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Stored pipelines, newest first, a page at a time, with the total that match."""
    with reported(ctx):
        orchestrator = ctx.orchestrator()
        now = orchestrator.clock.now()
        page = orchestrator.query(
            status=status, name=name, version=version, tenant=tenant, key=key,
            param=parse_param_filter(param) if param is not None else None,
            since=parse_moment(since, "--since", now) if since is not None else None,
            until=parse_moment(until, "--until", now) if until is not None else None,
            limit=limit, after=after, count=True, state=state, attributes=parse_attributes(attrs),
        )  # fmt: skip
        blocked = orchestrator.blocked_on_page(page.pipelines) if ctx.has_app() else {}
        running = [r for r in page.pipelines if r.lease_expires_at is not None and r.lease_expires_at > now]
        workers = orchestrator.store.workers() if running else []
        holds = orchestrator.holds()
        states = {r.uuid: state_text(r, now, workers, blocked.get(r.uuid), holds) for r in page.pipelines}
        held = {r.uuid: text for r in page.pipelines if (text := substates.why(r, states[r.uuid], holds))}
        progress = current_progress(orchestrator, [r for r in page.pipelines if r.status not in TERMINAL])
    if as_json:
        echo_json(
            {"pipelines": [{**r.to_dict(), "state": states[r.uuid], "held": held.get(r.uuid),
                            "progress": progress.get(r.uuid)} for r in page.pipelines],
             "total": page.total, "next_after": page.next_after, "blocked": blocked}
        )  # fmt: skip
        return
    print_page(page, states, blocked, held, {uuid: progress_text(found) for uuid, found in progress.items()})


def current_progress(orchestrator: Orchestrator, records: list[PipelineRecord]) -> dict[str, dict[str, Any]]:
    """The progress its current step last stored, by pipeline uuid, for the live pipelines of a
    page: one read of their steps (none when the page has no live pipeline)."""
    if not records:
        return {}
    uuids = [r.uuid for r in records]
    found = orchestrator.store.steps_of_many(uuids) or {uuids[0]: orchestrator.store.steps_of(uuids[0])}
    progress = {}
    for record in records:
        current = record.metadata.get("current_step")
        step = next((s for s in found.get(record.uuid, []) if s.uuid == current and s.progress), None)
        if step is not None and step.progress is not None:
            progress[record.uuid] = step.progress
    return progress


@click.command()
@click.argument("uuid", required=False)
@click.option(
    "--key", help="Show the pipeline created with this key (prorch start --key) instead: the live one, else the newest."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--traceback/--no-traceback",
    "tracebacks",
    default=True,
    show_default=True,
    help="Print the traceback of a failed step's error.",
)
@click.option("--logs", "logs", is_flag=True, help="Print what each step's hooks logged (self.log), by attempt.")
@click.pass_obj
def show(ctx: Context, uuid: str | None, key: str | None, as_json: bool, tracebacks: bool, logs: bool = False) -> None:
    """A pipeline's steps, outputs, errors (with their tracebacks) and history."""
    with reported(ctx):
        if (uuid is None) == (key is None):
            raise InvalidParamsError("give a pipeline's UUID or --key KEY, one of the two")
        orchestrator = ctx.orchestrator()
        loaded = ctx.has_app()  # without the workers' code, missing code is no sign of a block
        if key is not None:
            state = orchestrator.get_by_key(key, workers_code=loaded)
        else:
            state = orchestrator.get(uuid or "", workers_code=loaded)
        history = orchestrator.history(state.pipeline.uuid)
        moment, reason = state.next_run(orchestrator.clock.now(), history)
        now = orchestrator.clock.now()
        workers = orchestrator.store.workers()
        holder = lease_holder(state.pipeline, workers, now)
        holds = orchestrator.holds()
        current = state_text(state.pipeline, now, workers, state.blocked, holds)
        held = substates.why(state.pipeline, current, holds)
        reason = held or reason  # not "due now" while a pause or a limit holds it
    if as_json:
        echo_json(
            {
                "pipeline": state.pipeline.to_dict(),
                "steps": [s.to_dict() for s in state.steps],
                "history": [e.to_dict() for e in history],
                "blocked": state.blocked,
                "code_missing": state.code_missing,
                "children": [{"uuid": c.uuid, "name": c.name, "status": c.status.value} for c in state.children],
                "next_run": {"at": moment.isoformat() if moment else None, "reason": reason},
                "worker": holder,
                "state": current,
                "held": held,
            }
        )
        return
    text = holder_text(holder) if holder is not None else held
    limits = step_limits(orchestrator.registry, state.steps)
    print_state(state, history, now, limits, tracebacks, holder=text, current=current, held=held, logs=logs)


@click.command()
@click.argument("uuid")
@click.option("--timeout", type=float, help="Seconds to wait at most (default: until it ends).")
@click.pass_obj
def wait(ctx: Context, uuid: str, timeout: float | None) -> None:
    """Wait until pipeline UUID ends (a worker runs it) and print its result as JSON. Exit 0
    when it finished, 1 when it failed or was cancelled, or the timeout passed."""
    with reported(ctx):
        orchestrator = ctx.orchestrator()
        record = orchestrator.get(uuid).pipeline
        if record.status not in TERMINAL:  # say once what we wait for: a silent command looks hung
            bound = f"--timeout {timeout:g}" if timeout is not None else "no --timeout: until it ends"
            click.echo(
                f"waiting for pipeline {uuid} ({record.name}, {record.status.value}) to end; "
                f"a worker must run it (prorch worker or prorch run) ({bound})",
                err=True,
            )
        try:
            result = orchestrator.wait(uuid, timeout=timeout)
        except (PipelineFailedError, WaitTimeoutError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
    echo_json(result)


@click.command()
@click.argument("uuid")
@click.option("--after", type=click.IntRange(0), help="Only the entries after this cursor (the last SEQ you read).")
@click.option("--follow", is_flag=True, help="Wait for more entries until the pipeline ends.")
@click.option("--timeout", type=float, help="With --follow: seconds to wait at most (exit 1 after them).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object a line: seq, at, value.")
@click.pass_obj
def stream(ctx: Context, uuid: str, after: int | None, follow: bool, timeout: float | None, as_json: bool) -> None:
    """Print the entries of pipeline UUID's stream (what its hooks emit), oldest first: SEQ (the
    cursor to resume after with --after), time, value as JSON. Only entries stored with their
    hook's transition are shown. Exit 1 when --timeout passes before the pipeline ends."""
    with reported(ctx):
        orchestrator = ctx.orchestrator()
        try:
            for entry in orchestrator.stream(uuid, after, follow=follow, timeout=timeout):
                at = entry.at.isoformat(timespec="milliseconds")
                value = json.dumps(entry.value, ensure_ascii=False)
                line = (
                    json.dumps({"seq": entry.seq, "at": at, "value": entry.value})
                    if as_json
                    else f"{entry.seq}  {at}  {value}"
                )
                click.echo(line)
        except WaitTimeoutError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.command()
@click.argument("name")
@click.option("--version", "version", type=int, help="The pipeline version (default: the newest).")
@click.pass_obj
def schema(ctx: Context, name: str, version: int | None) -> None:
    """The JSON Schema of pipeline NAME's Params and of each step's Output."""
    with reported(ctx):
        ctx.loaded()
        ctx.import_apps()
        echo_json(pipeline_schema(current_registry().pipeline(name, version)))


@click.command()
@click.option("--next", "count", type=click.IntRange(1, 100), default=3, show_default=True, help="Ticks to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def schedules(ctx: Context, count: int, as_json: bool) -> None:
    """The recurring schedules of your pipelines (--app) and their next ticks, in UTC."""
    with reported(ctx):
        ctx.loaded()
        ctx.import_apps()
        now = datetime.now(timezone.utc)
        found = [(schedule, schedule.upcoming(now, count)) for _, schedule in scheduled(current_registry())]
    if as_json:
        echo_json(
            [
                {"pipeline": s.name, "schedule": s.cron, "every_seconds": s.every.total_seconds() if s.every else None,
                 "tz": str(s.tz), "catch_up": s.catch_up, "next": [t.isoformat() for t in ticks]}
                for s, ticks in found
            ]
        )  # fmt: skip
        return
    if not found:
        click.echo("no schedules: declare schedule = '0 3 * * *' or every = timedelta(...) on a pipeline (--app)")
        return
    rows = [["PIPELINE", "SCHEDULE", "CATCH UP", "NEXT TICKS"]]
    rows += [[s.name, s.description, s.catch_up, ", ".join(format_time(t) for t in ticks)] for s, ticks in found]
    print_table(rows)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def workers(ctx: Context, as_json: bool) -> None:
    """The workers with a row in the store: live ones, and stale ones (dead or frozen: their
    heartbeat is late; their pipelines resume when their leases run out)."""
    with reported(ctx):
        orchestrator = ctx.orchestrator()
        rows, now = orchestrator.store.workers(), orchestrator.clock.now()
    if as_json:
        echo_json([row.summary(now) for row in rows])
        return
    if not rows:
        click.echo("no worker has a row in this store (none running, or all stopped cleanly)")
        return
    table = [["WORKER", "STATE", "VERSION", "APP", "STARTED", "HEARTBEAT", "HOOKS", "FREE"]]
    for row in rows:
        state = "alive" if row.alive(now) else "STALE"
        beat = f"{format_seconds((now - row.heartbeat_at).total_seconds())} ago"
        table.append([row.id, state, row.prorch_version, row.app_version or "-", format_time(row.started_at), beat,
                      f"{row.in_flight}/{row.concurrency}", str(row.free_slots)])  # fmt: skip
    print_table(table)
