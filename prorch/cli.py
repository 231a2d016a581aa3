"""The ``prorch`` command: a thin shell over the library. Each option can also be set with a
``PRORCH_*`` environment variable. Exit codes: 0 ok, 1 an operation failed, 2 usage error."""

from __future__ import annotations

import importlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from prorch import demo as demo_module
from prorch.exceptions import ConfigurationError, ProrchError
from prorch.orchestrator import DEFAULT_INTERVAL_SECONDS, Orchestrator, PipelineState
from prorch.records import EventRecord
from prorch.registry import isolated_registry
from prorch.status import TERMINAL
from prorch.store import resolve_backend

DEFAULT_REPOSITORY_URL = "sqlite:///prorch.db"


class Context:
    def __init__(self, repository: str, apps: tuple[str, ...], verbose: bool) -> None:
        self.repository = repository
        self.apps = apps
        self.verbose = verbose

    def orchestrator(self, **options: Any) -> Orchestrator:
        for app in self.apps:
            try:
                importlib.import_module(app)
            except ImportError as exc:
                raise ConfigurationError(f"cannot import app module {app!r}: {exc}") from exc
        return Orchestrator(self.repository, **options)


@contextmanager
def reported_errors(ctx: Context) -> Iterator[None]:
    """One clear line per error (a traceback with --verbose), and a meaningful exit code."""
    try:
        yield
    except ProrchError as exc:
        if ctx.verbose:
            raise
        fail(str(exc), 2 if isinstance(exc, ConfigurationError) else 1)


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group()
@click.option(
    "--repository",
    "-r",
    envvar="PRORCH_REPOSITORY",
    default=DEFAULT_REPOSITORY_URL,
    show_default=True,
    help="Repository URL (sqlite:///..., postgresql://..., tinydb:///..., memory://).",
)
@click.option(
    "--app",
    "apps",
    multiple=True,
    envvar="PRORCH_APP",
    help="Dotted module that defines your pipelines (repeatable).",
)
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def main(click_ctx: click.Context, repository: str, apps: tuple[str, ...], verbose: bool) -> None:
    """prorch: resumable step pipelines."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    click_ctx.obj = Context(repository, apps, verbose)


@main.command()
@click.pass_obj
def run(ctx: Context) -> None:
    """Run one pass over the due pipelines (for cron) and print what it did."""
    with reported_errors(ctx):
        summary = ctx.orchestrator().execute_pipelines()
    click.echo(
        f"claimed {summary.claimed}, finished {summary.finished}, failed {summary.failed}, "
        f"waiting {summary.waiting}, blocked {len(summary.blocked)}, errors {len(summary.errors)}"
    )
    for uuid, reason in {**summary.blocked, **summary.errors}.items():
        click.echo(f"  {uuid}: {reason}")
    if summary.errors:
        sys.exit(1)


@main.command()
@click.option(
    "--interval",
    type=float,
    default=DEFAULT_INTERVAL_SECONDS,
    show_default=True,
    envvar="PRORCH_INTERVAL",
    help="Seconds between passes.",
)
@click.pass_obj
def worker(ctx: Context, interval: float) -> None:
    """Run passes until SIGTERM or SIGINT."""
    with reported_errors(ctx):
        ctx.orchestrator().run_forever(interval=interval)


@main.command(name="list")
@click.option("--status", type=click.Choice(["created", "pending", "finished", "failed", "cancelled"]))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_pipelines(ctx: Context, status: str | None, as_json: bool) -> None:
    """List stored pipelines, newest first."""
    with reported_errors(ctx):
        records = ctx.orchestrator().list_pipelines(status=status)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in records], indent=2))
        return
    for r in records:
        click.echo(f"{r.uuid}  {r.status.value:<9}  {r.name} v{r.version}")


@main.command()
@click.argument("uuid")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def show(ctx: Context, uuid: str, as_json: bool) -> None:
    """Show a pipeline: its steps, outputs, errors and history."""
    with reported_errors(ctx):
        orchestrator = ctx.orchestrator()
        state = orchestrator.get(uuid)
        history = orchestrator.history(uuid)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "pipeline": state.pipeline.to_dict(),
                    "steps": [s.to_dict() for s in state.steps],
                    "history": [e.to_dict() for e in history],
                    "blocked": state.blocked,
                },
                indent=2,
            )
        )
        return
    print_state(state)
    print_history(history)


def print_history(history: list[EventRecord]) -> None:
    click.echo("history:")
    for event in history:
        step = f" {event.data['step']}" if "step" in event.data else ""
        click.echo(f"  {event.at:%H:%M:%S.%f}  {event.type.value}{step}")


def print_state(state: PipelineState) -> None:
    p = state.pipeline
    click.echo(f"{p.name} v{p.version}  {p.uuid}  {p.status.value}")
    if state.blocked:
        click.echo(f"  BLOCKED: {state.blocked}")
    for s in state.steps:
        line = f"  {s.position}. {s.name:<32} {s.status.value:<9}"
        if s.output is not None:
            line += f" output={json.dumps(s.output)}"
        if s.error is not None:
            line += f" error={s.error.type}: {s.error.message}"
        click.echo(line)


@main.command()
@click.option(
    "--repository",
    "-r",
    "demo_repository",
    default=None,
    help="Repository URL for the demo (default: a temporary SQLite file).",
)
@click.pass_obj
def demo(ctx: Context, demo_repository: str | None) -> None:
    """Run the backup example end to end on a temporary SQLite file."""
    demo_module.echo = click.echo
    with tempfile.TemporaryDirectory(prefix="prorch-demo-") as folder, isolated_registry() as registry:
        url = demo_repository or f"sqlite:///{Path(folder) / 'demo.db'}"
        with reported_errors(ctx):
            pipeline_cls = demo_module.register(registry)
            backend = resolve_backend(url)  # one store shared by create() and the orchestrator
            orchestrator = Orchestrator(backend, registry=registry)
            click.echo(f"prorch demo on {url}")
            run_ = pipeline_cls.create(backend, {"path": "/var/lib/app"})
            click.echo(f"created {pipeline_cls.name} {run_.uuid}; resuming it pass by pass:")
            started = time.monotonic()
            passes = 0
            while orchestrator.get(run_.uuid).pipeline.status not in TERMINAL:
                passes += 1
                orchestrator.execute_pipelines()
                time.sleep(demo_module.POLL_SECONDS / 2)
            state = orchestrator.get(run_.uuid)
            history = orchestrator.history(run_.uuid)
        click.echo(f"\n{passes} passes in {time.monotonic() - started:.1f}s; final state:")
        print_state(state)
        print_history(history)
    if state.pipeline.status.value != "finished":
        sys.exit(1)
