"""The ``prorch`` command: a thin shell over the library.

Settings come from defaults < ``prorch.toml`` / ``[tool.prorch]`` < ``PRORCH_*`` < flags
(``prorch config`` shows the result). Exit codes: 0 ok, 1 an operation failed, 2 a usage or
configuration error. Errors are one line on stderr; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from typing import Any

import click

from prorch.cli import demo as demo_module
from prorch.cli.helpers import (
    STATUSES,
    Context,
    parse_param_filter,
    parse_params,
    reported,
    worker_options,
)
from prorch.cli.output import (
    echo_json,
    pipeline_schema,
    print_page,
    print_state,
    print_summary,
    print_table,
)
from prorch.display import format_seconds, format_time, holder_text, lease_holder, step_limits
from prorch.engine.outage import Outage, open_when_reachable
from prorch.features.schedules import scheduled
from prorch.model.exceptions import (
    ConfigurationError,
    InvalidMessageError,
    InvalidParamsError,
    PipelineFailedError,
    WaitTimeoutError,
    WorkerUnhealthyError,
)
from prorch.model.registry import current_registry
from prorch.model.secrets import redact_url
from prorch.model.status import TERMINAL, Status
from prorch.pipeline import pipeline_class
from prorch.storage.listing import MAX_LIMIT, parse_age, parse_moment
from prorch.storage.outside import NO_PAYLOAD

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    envvar="PRORCH_CONFIG",
    help="Config file (default: ./prorch.toml, else [tool.prorch] in ./pyproject.toml).",
)
@click.option(
    "--repository",
    "-r",
    help="Repository URL (sqlite:///..., postgresql://..., tinydb:///..., memory://), or module:factory "
    "naming your own IRepository class, backend, or a function returning one.",
)
@click.option("--app", "app", multiple=True, help="Module that defines your pipelines (repeatable).")
@click.option("--plugins", "plugins", multiple=True, help="Module that registers plugins (repeatable).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-format", type=click.Choice(["text", "json"]))
@click.option("--verbose", "-v", is_flag=True, help="Debug logs and tracebacks.")
@click.version_option(package_name="prorch")
@click.pass_context
def main(click_ctx: click.Context, /, config_file: str | None, verbose: bool, **flags: Any) -> None:
    """prorch: resumable step pipelines. Run `prorch demo` to see one."""
    click_ctx.obj = Context(flags, config_file, verbose)


@main.command()
@worker_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_obj
def run(ctx: Context, /, as_json: bool, **flags: Any) -> None:
    """One pass over the due pipelines, for cron. Exit 1 if a pipeline hit an engine error."""
    with reported(ctx):
        summary = ctx.orchestrator(**flags).execute_pipelines()
    print_summary(summary, as_json)
    if summary.abandoned_hooks:
        # a hung hook's thread would keep the interpreter's exit waiting on nothing useful
        click.echo(f"error: {summary.abandoned_hooks} hook(s) did not return in time and were abandoned", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if summary.errors:
        sys.exit(1)


@main.command()
@click.option("--interval", type=float, help="Seconds between passes.")
@click.option("--metrics-port", type=int, help="Serve /metrics (Prometheus) and /healthz on this port.")
@worker_options
@click.pass_obj
def worker(ctx: Context, /, **flags: Any) -> None:
    """Run passes until SIGTERM or SIGINT: running hooks finish, leases are released, exit 0.
    A second signal exits at once."""
    with reported(ctx):
        settings = ctx.loaded(**flags).settings
        opening = Outage(settings.interval, log_every_try=True)
        endpoint = None
        if settings.metrics_port is not None:  # up first: /healthz says 503 while the store cannot be opened
            try:
                from prorch.observability.server import serve
            except ImportError as exc:
                hint = f"--metrics-port needs its extra: pip install 'prorch[metrics]' ({exc})"
                raise ConfigurationError(hint) from exc
            endpoint = serve(None, settings.metrics_port, settings.interval, opening=opening)
            click.echo(f"metrics on http://0.0.0.0:{settings.metrics_port}/metrics, health on /healthz", err=True)
        orchestrator = open_when_reachable(lambda: ctx.orchestrator(**flags), opening)  # a database not up yet
        if endpoint is not None:
            endpoint.attach(orchestrator)
        click.echo(f"prorch worker {orchestrator.owner} on {redact_url(settings.repository)}", err=True)
        try:
            orchestrator.run_forever(interval=settings.interval)
        except WorkerUnhealthyError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # hung hook threads cannot be joined: leave without waiting for them


@main.command()
@click.argument("name")
@click.option(
    "--param",
    "-p",
    "pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="A parameter (repeatable); VALUE is read as JSON when it parses, else as text.",
)
@click.option("--params-json", help="All parameters as one JSON object.")
@click.option("--version", "version", type=int, help="The pipeline version to run (default: the newest).")
@click.option("--tenant", help="The tenant, for tenant plugins.")
@click.option("--priority", type=int, help="Higher runs first.")
@click.option(
    "--key",
    help="Create it once: a repeat with this key, NAME and params prints the stored pipeline's uuid "
    "and 'exists'; with another NAME or params it is an error.",
)
@click.option("--json", "as_json", is_flag=True, help='Print the pipeline as JSON, with "created": true/false.')
@click.pass_obj
def start(ctx: Context, name: str, pairs: tuple[str, ...], params_json: str | None, version: int | None,
          tenant: str | None, priority: int | None, key: str | None, as_json: bool) -> None:  # fmt: skip
    """Create a pipeline NAME, pending and due now (the next pass runs it). Prints its uuid, with
    ' exists' after it when --key found it already stored."""
    with reported(ctx):
        params = parse_params(pairs, params_json)
        repository = ctx.repository()
        ctx.import_apps()
        pipeline_cls = pipeline_class(current_registry(), name, version)
        settings = ctx.settings
        override = settings.pipelines.get(name)
        if priority is None and override is not None:
            priority = override.priority
        created = pipeline_cls.create(repository, params, key=key, tenant=tenant, priority=priority)
    if as_json:
        echo_json({**created.record.to_dict(), "created": created.created})
    else:
        click.echo(created.uuid if created.created else f"{created.uuid} exists")


@main.command(name="list")
@click.option("--status", type=click.Choice(STATUSES), help="Only pipelines with this status.")
@click.option("--name", help="Only pipelines with this name.")
@click.option("--version", "version", type=int, help="Only pipelines of this version.")
@click.option("--tenant", help="Only pipelines of this tenant.")
@click.option("--key", help="Only the pipeline created with this key.")
@click.option(
    "--param",
    "param",
    metavar="NAME=VALUE",
    help="Only pipelines whose params field NAME equals VALUE (JSON when it parses).",
)
@click.option("--since", help="Created at or after: an age (30m, 2h, 7d) or an ISO time.")
@click.option("--until", help="Created before: an age (30m, 2h, 7d) or an ISO time.")
@click.option("--limit", type=click.IntRange(1, MAX_LIMIT), default=50, show_default=True, help="Pipelines per page.")
@click.option("--after", metavar="UUID", help="The page after this pipeline (the 'next page' uuid printed last).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_pipelines(ctx: Context, status: str | None, name: str | None, version: int | None, tenant: str | None,
                   key: str | None, param: str | None, since: str | None, until: str | None, limit: int,
                   after: str | None, as_json: bool) -> None:  # fmt: skip
    """Stored pipelines, newest first, a page at a time, with the total that match."""
    with reported(ctx):
        orchestrator = ctx.orchestrator()
        now = orchestrator.clock.now()
        page = orchestrator.query(
            status=status, name=name, version=version, tenant=tenant, key=key,
            param=parse_param_filter(param) if param is not None else None,
            since=parse_moment(since, "--since", now) if since is not None else None,
            until=parse_moment(until, "--until", now) if until is not None else None,
            limit=limit, after=after, count=True,
        )  # fmt: skip
        blocked = orchestrator.blocked_on_page(page.pipelines) if ctx.has_app() else {}
    if as_json:
        echo_json(
            {"pipelines": [r.to_dict() for r in page.pipelines], "total": page.total, "next_after": page.next_after,
             "blocked": blocked}
        )  # fmt: skip
        return
    print_page(page, blocked)


@main.command()
@click.argument("uuid", required=False)
@click.option("--key", help="Show the pipeline created with this key (prorch start --key) instead.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--traceback/--no-traceback",
    "tracebacks",
    default=True,
    show_default=True,
    help="Print the traceback of a failed step's error.",
)
@click.pass_obj
def show(ctx: Context, uuid: str | None, key: str | None, as_json: bool, tracebacks: bool) -> None:
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
        holder = lease_holder(state.pipeline, orchestrator.store.workers(), orchestrator.clock.now())
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
            }
        )
        return
    limits = step_limits(orchestrator.registry, state.steps)
    text = holder_text(holder) if holder is not None else None
    print_state(state, history, orchestrator.clock.now(), limits, tracebacks, holder=text)


@main.command()
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


@main.command()
@click.argument("uuid")
@click.pass_obj
def cancel(ctx: Context, uuid: str) -> None:
    """Cancel a pipeline (its current step's on_cancel runs), or ask its worker to."""
    with reported(ctx):
        state = ctx.orchestrator().cancel(uuid)
    if state.pipeline.status == Status.CANCELLED:
        click.echo(f"cancelled {uuid}")
    else:
        click.echo(f"cancel requested for {uuid}: the worker holding it cancels it at its next transition")


@main.command()
@click.argument("uuid")
@click.pass_obj
def retry(ctx: Context, uuid: str) -> None:
    """Resume a failed pipeline from its failed step (the next pass runs it)."""
    with reported(ctx):
        ctx.orchestrator().retry(uuid)
    click.echo(f"retrying {uuid}")


@main.command()
@click.argument("uuid")
@click.argument("name")
@click.option("--payload-json", help="The message's payload, as JSON (default: true; null is refused).")
@click.pass_obj
def send(ctx: Context, uuid: str, name: str, payload_json: str | None) -> None:
    """Send message NAME to a pipeline; it is due at once and a hook reads it with receive()."""
    with reported(ctx):
        try:
            payload = json.loads(payload_json) if payload_json is not None else NO_PAYLOAD
        except json.JSONDecodeError as exc:
            raise InvalidMessageError(f"--payload-json is not valid JSON: {exc}") from exc
        except RecursionError:
            raise InvalidMessageError("--payload-json is nested too deeply (at most 100 levels)") from None
        message = ctx.orchestrator().send(uuid, name, payload)
    click.echo(f"sent {name} to {uuid} ({message.uuid})")


@main.command()
@click.argument("name")
@click.option("--version", "version", type=int, help="The pipeline version (default: the newest).")
@click.pass_obj
def schema(ctx: Context, name: str, version: int | None) -> None:
    """The JSON Schema of pipeline NAME's Params and of each step's Output."""
    with reported(ctx):
        ctx.loaded()
        ctx.import_apps()
        echo_json(pipeline_schema(current_registry().pipeline(name, version)))


@main.command()
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


@main.command()
@click.option("--older-than", "older_than", required=True, help="Age of the last change: 30d, 12h, 90m.")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(["finished", "failed", "cancelled"]),
    help="Which ended pipelines (repeatable; default: finished and cancelled).",
)
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=500, show_default=True)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.pass_obj
def purge(ctx: Context, older_than: str, statuses: tuple[str, ...], batch_size: int, dry_run: bool) -> None:
    """Delete ended pipelines older than --older-than, with their steps, events and messages,
    in short batches (running workers wait at most one batch)."""
    with reported(ctx):
        age = parse_age(older_than, "--older-than")
        chosen = statuses or ("finished", "cancelled")
        summary = ctx.orchestrator().purge(age, chosen, batch_size=batch_size, dry_run=dry_run)
    what = ", ".join(chosen)
    if dry_run:
        click.echo(f"would purge {summary.pipelines} pipelines ({what}) older than {older_than}")
    else:
        click.echo(
            f"purged {summary.pipelines} pipelines ({what}) older than {older_than} in {summary.batches} "
            f"batches (longest {summary.longest_batch_seconds:.3f}s)"
        )


@main.command(name="config")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def show_config(ctx: Context, as_json: bool) -> None:
    """The effective settings and where each came from."""
    with reported(ctx):
        loaded = ctx.loaded()
    values = loaded.settings.model_dump(mode="json")
    values["repository"] = redact_url(values["repository"])
    if as_json:
        echo_json({"settings": values, "origins": loaded.origins, "config_file": loaded.config_file})
        return
    rows = [["SETTING", "VALUE", "FROM"]]
    rows += [[key, json.dumps(value), loaded.origins[key]] for key, value in values.items()]
    print_table(rows)


@main.command()
@click.option("--host", help="Address to listen on (default 127.0.0.1: this machine only).")
@click.option("--port", type=int, help="Port to listen on (default 8181).")
@click.option(
    "--allowed-host",
    "allowed_host",
    multiple=True,
    help="A host name the dashboard answers to, besides its address and localhost (repeatable; * for any).",
)
@click.pass_obj
def dashboard(ctx: Context, host: str | None, port: int | None, allowed_host: tuple[str, ...]) -> None:
    """The web dashboard: overview, pipelines, one pipeline, actions (with a token) and /api/.
    Needs pip install 'prorch[dashboard]'."""
    with reported(ctx):
        loaded = ctx.loaded(
            dashboard_host=host, dashboard_port=port, dashboard_allowed_hosts=list(allowed_host) or None
        )
        try:
            import uvicorn

            from prorch.dashboard import create_app
            from prorch.dashboard.security import allowed_hosts
        except ImportError as exc:
            raise ConfigurationError(
                f"prorch dashboard needs its extra: pip install 'prorch[dashboard]' ({exc})"
            ) from exc
        settings = loaded.settings
        orchestrator = ctx.orchestrator()
        token = settings.dashboard_token.get_secret_value() if settings.dashboard_token else None
        host, port = settings.dashboard_host, settings.dashboard_port
        hosts = allowed_hosts(host, settings.dashboard_allowed_hosts)
        app = create_app(orchestrator, token=token, store_name=redact_url(settings.repository), allowed_hosts=hosts)
    if not token:
        click.echo("dashboard is read-only: set PRORCH_DASHBOARD_TOKEN to allow cancel, retry and send", err=True)
    if host not in LOOPBACK and not token:
        click.echo(
            f"warning: listening on {host} without a token: anyone who reaches this port sees your "
            "pipelines' params and outputs; set PRORCH_DASHBOARD_TOKEN, or bind 127.0.0.1 behind a proxy",
            err=True,
        )
    click.echo(f"prorch dashboard on http://{host}:{port}/ ({redact_url(settings.repository)})", err=True)
    click.echo(f"answering to Host: {', '.join(hosts)} (add names with --allowed-host)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@main.command()
@click.option("--repository", "-r", "demo_repository", help="Repository URL (default: a temporary SQLite file).")
@click.pass_obj
def demo(ctx: Context, demo_repository: str | None) -> None:
    """The backup example, end to end, on a temporary SQLite file."""
    if not demo_module.run(ctx, demo_repository):
        sys.exit(1)


@main.command()
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
