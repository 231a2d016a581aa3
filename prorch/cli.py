"""The ``prorch`` command: a thin shell over the library.

Settings come from defaults < ``prorch.toml`` / ``[tool.prorch]`` < ``PRORCH_*`` < flags
(``prorch config`` shows the result). Exit codes: 0 ok, 1 an operation failed, 2 a usage or
configuration error. Errors are one line on stderr; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from prorch import demo as demo_module
from prorch import logs, plugins
from prorch.config import LoadedSettings, Settings, closest, load_settings
from prorch.definition import PipelineDefinition
from prorch.exceptions import (
    ConfigurationError,
    InvalidMessageError,
    InvalidParamsError,
    KeyConflictError,
    NotRegisteredError,
    ProrchError,
    WorkerUnhealthyError,
)
from prorch.orchestrator import Orchestrator, PassSummary, PipelineState
from prorch.pipeline import pipeline_class
from prorch.records import EventRecord, PipelineRecord
from prorch.registry import current_registry, isolated_registry
from prorch.secrets import redact_url
from prorch.status import TERMINAL, Status
from prorch.store import resolve_backend

USAGE_ERRORS = (ConfigurationError, NotRegisteredError, InvalidParamsError, InvalidMessageError, KeyConflictError)
STATUSES = [status.value for status in Status]


class Context:
    """What every command needs: the flags given to the group, loaded into settings on demand."""

    def __init__(self, flags: dict[str, Any], config_file: str | None, verbose: bool) -> None:
        self.flags = flags
        self.config_file = config_file
        self.verbose = verbose
        self._loaded: LoadedSettings | None = None

    def loaded(self, **more_flags: Any) -> LoadedSettings:
        if self._loaded is None or more_flags:
            self._loaded = load_settings({**self.flags, **more_flags}, config_file=self.config_file)
            settings = self._loaded.settings
            logs.configure("DEBUG" if self.verbose else settings.log_level, settings.log_format)
            for warning in self._loaded.warnings:
                click.echo(f"warning: {warning}", err=True)
        return self._loaded

    @property
    def settings(self) -> Settings:
        return self.loaded().settings

    def import_apps(self) -> None:
        """Import the user's modules, so that their pipelines register (cwd is importable, as
        with ``python -m``)."""
        wanted = [*self.settings.app, *self.settings.plugins]
        if wanted and str(Path.cwd()) not in sys.path:
            sys.path.append(str(Path.cwd()))  # after the installed packages: a stray ./sqlite3.py shadows nothing
        for module in self.settings.app:
            try:
                importlib.import_module(module)
            except ProrchError as exc:  # e.g. two steps registered under one name
                raise ConfigurationError(f"app module {module!r} failed to import: {exc}") from exc
            except Exception as exc:  # a SyntaxError or an exception at import: one line, -v for the traceback
                raise ConfigurationError(f"cannot import app module {module!r}: {type(exc).__name__}: {exc}") from exc
        plugins.discover(self.settings.plugins)
        self.warn_unknown_overrides()

    def warn_unknown_overrides(self) -> None:
        """A ``[steps.X]`` or ``[pipelines.X]`` table naming nothing registered is a typo to report."""
        if not self.settings.app:
            return  # without the user's code loaded, nothing can be judged
        registry = current_registry()
        for kind, names, known in (
            ("steps", self.settings.steps, registry.steps),
            ("pipelines", self.settings.pipelines, registry.pipelines),
        ):
            for name in names:
                if name not in known:
                    hint = closest(name, known)
                    click.echo(f"warning: [{kind}.{name}] names no registered {kind[:-1]}; ignored{hint}", err=True)

    def orchestrator(self, **more_flags: Any) -> Orchestrator:
        settings = self.loaded(**more_flags).settings
        refuse_transient(settings.repository)
        self.import_apps()
        return Orchestrator(
            settings.repository,
            concurrency=settings.concurrency,
            batch_size=settings.batch_size,
            lease_seconds=settings.lease_seconds,
            max_crashes=settings.max_crashes,
            step_overrides=settings.steps,
            hook_timeout=settings.hook_timeout,
            max_abandoned_hooks=settings.max_abandoned_hooks,
            shutdown_grace=settings.shutdown_grace,
        )


def refuse_transient(url: str) -> None:
    """A command's store must outlive the command: an in-memory one would keep nothing."""
    if url.rstrip("/") in ("sqlite:", "sqlite:///:memory:", "memory:") or url.startswith("memory://"):
        raise ConfigurationError(
            f"repository {url!r} lives in memory and keeps nothing after this command exits; "
            "use a file, e.g. sqlite:///prorch.db"
        )


@contextmanager
def reported(ctx: Context) -> Iterator[None]:
    """One clear line per error (the traceback with --verbose) and a meaningful exit code."""
    try:
        yield
    except ProrchError as exc:
        if ctx.verbose:
            raise
        fail(str(exc), 2 if isinstance(exc, USAGE_ERRORS) else 1)


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def worker_options(command: Any) -> Any:
    """The pass settings, shared by ``run`` and ``worker``."""
    for option in reversed(
        [
            click.option("--concurrency", type=int, help="Hooks run at once by this process."),
            click.option("--batch-size", type=int, help="Pipelines claimed per pass."),
            click.option("--lease-seconds", type=float, help="How long a claim lasts unrenewed."),
            click.option("--hook-timeout", type=float, help="Seconds a hook call may take when its step sets none."),
        ]
    ):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    envvar="PRORCH_CONFIG",
    help="Config file (default: ./prorch.toml, else [tool.prorch] in ./pyproject.toml).",
)
@click.option("--repository", "-r", help="Repository URL (sqlite:///..., postgresql://..., tinydb:///..., memory://).")
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


# --- running -----------------------------------------------------------------------------------


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


@main.command()
@click.option("--interval", type=float, help="Seconds between passes.")
@worker_options
@click.pass_obj
def worker(ctx: Context, /, **flags: Any) -> None:
    """Run passes until SIGTERM or SIGINT: running hooks finish, leases are released, exit 0.
    A second signal exits at once."""
    with reported(ctx):
        orchestrator = ctx.orchestrator(**flags)
        settings = ctx.settings
        click.echo(f"prorch worker {orchestrator.owner} on {redact_url(settings.repository)}", err=True)
        try:
            orchestrator.run_forever(interval=settings.interval)
        except WorkerUnhealthyError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # hung hook threads cannot be joined: leave without waiting for them


# --- creating ----------------------------------------------------------------------------------


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
        refuse_transient(ctx.settings.repository)
        ctx.import_apps()
        pipeline_cls = pipeline_class(current_registry(), name, version)
        settings = ctx.settings
        override = settings.pipelines.get(name)
        if priority is None and override is not None:
            priority = override.priority
        created = pipeline_cls.create(settings.repository, params, key=key, tenant=tenant, priority=priority)
    if as_json:
        echo_json({**created.record.to_dict(), "created": created.created})
    else:
        click.echo(created.uuid if created.created else f"{created.uuid} exists")


def parse_params(pairs: tuple[str, ...], params_json: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if params_json is not None:
        try:
            loaded = json.loads(params_json)
        except json.JSONDecodeError as exc:
            raise InvalidParamsError(f"--params-json is not valid JSON: {exc}") from exc
        except RecursionError:
            raise InvalidParamsError("--params-json is nested too deeply (at most 100 levels)") from None
        if not isinstance(loaded, dict):
            raise InvalidParamsError('--params-json must be a JSON object, e.g. \'{"path": "/data"}\'')
        params.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidParamsError(f"--param {pair!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
        except RecursionError:
            raise InvalidParamsError(f"--param {key}: nested too deeply (at most 100 levels)") from None
    return params


# --- reading -----------------------------------------------------------------------------------


@main.command(name="list")
@click.option("--status", type=click.Choice(STATUSES), help="Only pipelines with this status.")
@click.option("--name", help="Only pipelines with this name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_pipelines(ctx: Context, status: str | None, name: str | None, as_json: bool) -> None:
    """Stored pipelines, newest first."""
    with reported(ctx):
        orchestrator = ctx.orchestrator()
        records = orchestrator.list_pipelines(status=status, name=name)
    if as_json:
        echo_json([r.to_dict() for r in records])
        return
    rows = [["UUID", "STATUS", "NAME", "VERSION", "CREATED", "NEXT RUN"]]
    rows += [[r.uuid, r.status.value, r.name, str(r.version), when(r.created_at), next_run(r)] for r in records]
    print_table(rows)


def when(moment: Any) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else "-"


def next_run(record: PipelineRecord) -> str:
    return when(record.next_run_at) if record.status not in TERMINAL else "-"


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@main.command()
@click.argument("uuid", required=False)
@click.option("--key", help="Show the pipeline created with this key (prorch start --key) instead.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def show(ctx: Context, uuid: str | None, key: str | None, as_json: bool) -> None:
    """A pipeline's steps, outputs, errors and history."""
    with reported(ctx):
        if (uuid is None) == (key is None):
            raise InvalidParamsError("give a pipeline's UUID or --key KEY, one of the two")
        orchestrator = ctx.orchestrator()
        state = orchestrator.get_by_key(key) if key is not None else orchestrator.get(uuid or "")
        history = orchestrator.history(state.pipeline.uuid)
    if as_json:
        echo_json(
            {
                "pipeline": state.pipeline.to_dict(),
                "steps": [s.to_dict() for s in state.steps],
                "history": [e.to_dict() for e in history],
                "blocked": state.blocked,
            }
        )
        return
    print_state(state)
    print_history(history)


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


# --- acting ------------------------------------------------------------------------------------


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
@click.option("--payload-json", help="The message's payload, as JSON (default: null).")
@click.pass_obj
def send(ctx: Context, uuid: str, name: str, payload_json: str | None) -> None:
    """Send message NAME to a pipeline; it is due at once and a hook reads it with receive()."""
    with reported(ctx):
        try:
            payload = json.loads(payload_json) if payload_json is not None else None
        except json.JSONDecodeError as exc:
            raise InvalidMessageError(f"--payload-json is not valid JSON: {exc}") from exc
        message = ctx.orchestrator().send(uuid, name, payload)
    click.echo(f"sent {name} to {uuid} ({message.uuid})")


# --- describing --------------------------------------------------------------------------------


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


def pipeline_schema(pipeline_cls: type[PipelineDefinition]) -> dict[str, Any]:
    any_object = {"type": "object"}
    return {
        "pipeline": pipeline_cls.name,
        "version": pipeline_cls.version,
        "params": pipeline_cls.Params.model_json_schema() if pipeline_cls.Params else any_object,
        "steps": {step.name: step.Output.model_json_schema() if step.Output else None for step in pipeline_cls.steps},
    }


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


# --- the demo ----------------------------------------------------------------------------------


@main.command()
@click.option("--repository", "-r", "demo_repository", help="Repository URL (default: a temporary SQLite file).")
@click.pass_obj
def demo(ctx: Context, demo_repository: str | None) -> None:
    """The backup example, end to end, on a temporary SQLite file."""
    demo_module.echo = click.echo
    with tempfile.TemporaryDirectory(prefix="prorch-demo-") as folder, isolated_registry() as registry:
        url = demo_repository or f"sqlite:///{Path(folder) / 'demo.db'}"
        with reported(ctx):
            pipeline_cls = demo_module.register(registry)
            backend = resolve_backend(url)  # one store shared by create() and the orchestrator
            orchestrator = Orchestrator(backend, registry=registry)
            click.echo(f"prorch demo on {url}")
            created = pipeline_cls.create(backend, {"path": "/var/lib/app"})
            click.echo(f"created {pipeline_cls.name} {created.uuid}; resuming it pass by pass:")
            started = time.monotonic()
            passes = 0
            while orchestrator.get(created.uuid).pipeline.status not in TERMINAL:
                passes += 1
                orchestrator.execute_pipelines()
                time.sleep(demo_module.POLL_SECONDS / 2)
            state = orchestrator.get(created.uuid)
            history = orchestrator.history(created.uuid)
        click.echo(f"\n{passes} passes in {time.monotonic() - started:.1f}s; final state:")
        print_state(state)
        print_history(history)
    if state.pipeline.status != Status.FINISHED:
        sys.exit(1)
