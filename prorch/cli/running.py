"""The commands that run pipelines: ``run`` (one pass), ``worker`` (passes until a signal),
``dashboard`` and ``demo``."""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

import click

from prorch.cli import demo as demo_module
from prorch.cli.helpers import (
    Context,
    reported,
    worker_options,
)
from prorch.cli.output import (
    print_summary,
)
from prorch.engine.outage import Outage, open_when_reachable
from prorch.model.exceptions import (
    ConfigurationError,
    WorkerUnhealthyError,
)
from prorch.model.secrets import redact_url

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@click.command()
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


@click.command()
@click.option("--interval", type=float, help="Seconds an idle worker waits at most between passes.")
@click.option("--wake-poll", type=float, help="Seconds between looks for other processes' work (SQLite, TinyDB).")
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
        freeze_loaded()
        try:
            orchestrator.run_forever(interval=settings.interval, wake_poll=settings.wake_poll)
        except WorkerUnhealthyError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # hung hook threads cannot be joined: leave without waiting for them


def freeze_loaded() -> None:
    """What is loaded by now (the app, prorch, the drivers) lives as long as the worker: move
    it out of the garbage collector's generations (``gc.freeze``), so that its full
    collections stop walking it. W1 on SQLite: the one full collection of a 3,000-transition
    run cost about 12 µs a transition, none after a freeze. Collected first, so that no
    garbage is frozen with it; the process is the worker's own (a library call would not)."""
    gc.collect()
    gc.freeze()


@click.command()
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
        app = create_app(
            orchestrator,
            token=token,
            store_name=redact_url(settings.repository),
            allowed_hosts=hosts,
            api_tokens=settings.api_tokens,
        )
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
    labels = ", ".join(sorted(settings.api_tokens))
    click.echo(f"HTTP API on /api/v1/ for tokens {labels}" if labels else
               "HTTP API /api/v1/ is closed: set PRORCH_API_TOKENS to open it (docs/api.md)", err=True)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="warning")


@click.command()
@click.option("--repository", "-r", "demo_repository", help="Repository URL (default: a temporary SQLite file).")
@click.pass_obj
def demo(ctx: Context, demo_repository: str | None) -> None:
    """The backup example, end to end, on a temporary SQLite file."""
    if not demo_module.run(ctx, demo_repository):
        sys.exit(1)
