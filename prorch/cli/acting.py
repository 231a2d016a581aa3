"""The commands that change pipelines from outside: ``start``, ``cancel``, ``retry``, ``rerun``,
``send``, ``pause``, ``resume`` (and ``pauses``, what is paused)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from prorch.bulk import BulkAction
from prorch.cli.bulk import bulk_exit, filter_options, one_or_many, run_bulk
from prorch.cli.helpers import (
    Context,
    params_options,
    parse_attributes,
    parse_params,
    reported,
)
from prorch.cli.output import (
    echo_json,
)
from prorch.display import format_time
from prorch.model.exceptions import (
    InvalidMessageError,
)
from prorch.model.registry import current_registry
from prorch.model.status import Status
from prorch.pipeline import pipeline_class
from prorch.storage.listing import parse_age
from prorch.storage.outside import NO_PAYLOAD
from prorch.storage.singletons import IF_RUNNING, IfRunning

F = TypeVar("F", bound=Callable[..., Any])
CLI_ACTOR = "cli"
"""The actor the history records for an action taken with ``prorch``."""


def reason_option() -> Callable[[F], F]:
    return click.option(
        "--reason", help='Why: recorded in the history event with the actor "cli" (prorch show prints it).'
    )


@click.command()
@click.argument("name")
@params_options()
@click.option("--version", "version", type=int, help="The pipeline version to run (default: the newest).")
@click.option("--tenant", help="The tenant, for tenant plugins.")
@click.option("--priority", type=int, help="Higher runs first.")
@click.option(
    "--key",
    help="Create it once: a repeat with this key, NAME and params prints the stored pipeline's uuid "
    "and 'exists'; with another NAME or params it is an error.",
)
@click.option(
    "--if-running",
    "if_running",
    type=click.Choice(IF_RUNNING),
    default="same",
    show_default=True,
    help="With --key, when the key's pipeline has not ended: 'same' as above; 'attach' prints its uuid "
    "and 'exists' whatever its params; 'error' refuses. With attach and error an ended pipeline does not "
    "hold its key.",
)
@click.option(
    "--debounce",
    help="With --key: a quiet window (30s, 5m): creates within it update the one pipeline still waiting "
    "(printed with 'updated') and push its start to the window's end.",
)
@click.option("--json", "as_json", is_flag=True, help='Print the pipeline as JSON, with "created": true/false.')
@click.option("--attr", "attrs", multiple=True, metavar="NAME=VALUE", help="A search attribute (repeatable).")
@click.pass_obj
def start(ctx: Context, name: str, pairs: tuple[str, ...], params_json: str | None, version: int | None,
          tenant: str | None, priority: int | None, key: str | None, if_running: IfRunning, debounce: str | None,
          as_json: bool, attrs: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Create a pipeline NAME, pending and due now (the next pass runs it). Prints its uuid, with
    ' exists' after it when --key found it already stored (' updated' with --debounce)."""
    with reported(ctx):
        params = parse_params(pairs, params_json)
        repository = ctx.repository()
        ctx.import_apps()
        pipeline_cls = pipeline_class(current_registry(), name, version)
        settings = ctx.settings
        override = settings.pipelines.get(name)
        if priority is None and override is not None:
            priority = override.priority
        window = parse_age(debounce, "--debounce") if debounce is not None else None
        attributes = parse_attributes(attrs)
        created = pipeline_cls.create(
            repository,
            params,
            key=key,
            tenant=tenant,
            priority=priority,
            if_running=if_running,
            debounce=window,
            attributes=attributes,
        )
    if as_json:
        echo_json({**created.record.to_dict(), "created": created.created})
    else:
        click.echo(created.uuid if created.created else f"{created.uuid} {'updated' if window else 'exists'}")


@click.command()
@click.argument("uuid", required=False)
@reason_option()
@filter_options()
@click.pass_obj
def cancel(ctx: Context, /, uuid: str | None, reason: str | None, dry_run: bool, yes: bool, batch_size: int,
           **filters: Any) -> None:  # fmt: skip
    """Cancel a pipeline (its current step's on_cancel runs), or ask its worker to. With filters
    instead of UUID: every matching pipeline that has not ended."""
    with reported(ctx):
        if one_or_many(uuid, filters):
            action = BulkAction("cancel", actor=CLI_ACTOR, reason=reason)
            bulk_exit(run_bulk(ctx, action, filters, dry_run=dry_run, yes=yes, batch_size=batch_size))
        assert uuid is not None
        state = ctx.orchestrator().cancel(uuid, actor=CLI_ACTOR, reason=reason)
    if state.pipeline.status == Status.CANCELLED:
        click.echo(f"cancelled {uuid}")
    else:
        click.echo(f"cancel requested for {uuid}: the worker holding it cancels it at its next transition")


@click.command()
@click.argument("uuid", required=False)
@reason_option()
@filter_options()
@click.pass_obj
def retry(ctx: Context, /, uuid: str | None, reason: str | None, dry_run: bool, yes: bool, batch_size: int,
          **filters: Any) -> None:  # fmt: skip
    """Resume a failed pipeline from its failed step (the next pass runs it). With filters
    instead of UUID: every matching failed pipeline."""
    with reported(ctx):
        if one_or_many(uuid, filters):
            action = BulkAction("retry", actor=CLI_ACTOR, reason=reason)
            bulk_exit(run_bulk(ctx, action, filters, dry_run=dry_run, yes=yes, batch_size=batch_size))
        assert uuid is not None
        ctx.orchestrator().retry(uuid, actor=CLI_ACTOR, reason=reason)
    click.echo(f"retrying {uuid}")


@click.command()
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


@click.command()
@click.argument("uuid", required=False)
@click.option("--from-step", "from_step", required=True, help="The step to run again; the steps before it are reused.")
@params_options(changes=True)
@click.option("--cancel-original", is_flag=True, help="Cancel the original first when it has not ended.")
@click.option("--json", "as_json", is_flag=True, help="Print the new pipeline as JSON.")
@reason_option()
@filter_options(param_flag="--match-param")
@click.pass_obj
def rerun(ctx: Context, /, uuid: str | None, from_step: str, pairs: tuple[str, ...], params_json: str | None,
          cancel_original: bool, as_json: bool, reason: str | None, dry_run: bool, yes: bool, batch_size: int,
          **filters: Any) -> None:  # fmt: skip
    """Start a new pipeline that reuses the outputs of the original's steps before --from-step
    and runs from that step on, optionally with changed params. Prints the new uuid. With
    filters instead of UUID: every matching ended pipeline (and, with --cancel-original, the
    others)."""
    with reported(ctx):
        changes = parse_params(pairs, params_json) if pairs or params_json is not None else None
        if one_or_many(uuid, filters):
            action = BulkAction(
                "rerun", from_step=from_step, params=changes, cancel_original=cancel_original,
                actor=CLI_ACTOR, reason=reason,
            )  # fmt: skip
            bulk_exit(run_bulk(ctx, action, filters, dry_run=dry_run, yes=yes, batch_size=batch_size))
        assert uuid is not None
        state = ctx.orchestrator().rerun(
            uuid, from_step, changes, cancel_original=cancel_original, actor=CLI_ACTOR, reason=reason
        )
    if as_json:
        echo_json(state.pipeline.to_dict())
    else:
        click.echo(f"{state.pipeline.uuid} reruns {uuid} from {from_step}")


def scope_options(verb: str) -> Callable[[F], F]:
    """The one scope ``pause`` and ``resume`` take: a pipeline UUID, --class (with --version) or --tenant."""

    def decorate(command: F) -> F:
        for option in reversed([
            click.argument("uuid", required=False),
            click.option("--class", "name", metavar="NAME", help=f"{verb} the pipeline class NAME (every version)."),
            click.option("--version", type=int, help=f"With --class: {verb.lower()} this version only."),
            click.option("--tenant", help=f"{verb} the pipelines of this tenant."),
            reason_option(),
        ]):  # fmt: skip
            command = option(command)
        return command

    return decorate


@click.command()
@scope_options("Pause")
@click.pass_obj
def pause(ctx: Context, uuid: str | None, name: str | None, version: int | None, tenant: str | None,
          reason: str | None) -> None:  # fmt: skip
    """Stop claiming the work of a pipeline UUID, a --class or a --tenant until `prorch resume`:
    a hook running now finishes, the next step waits; pipelines created meanwhile wait too."""
    with reported(ctx):
        paused = ctx.orchestrator().pause(
            name=name, version=version, tenant=tenant, uuid=uuid, actor=CLI_ACTOR, reason=reason
        )
    click.echo(f"paused {paused.label()}")


@click.command()
@scope_options("Resume")
@click.pass_obj
def resume(ctx: Context, uuid: str | None, name: str | None, version: int | None, tenant: str | None,
           reason: str | None) -> None:  # fmt: skip
    """End a pause (named as `prorch pause` named it): its due work is claimed at once."""
    with reported(ctx):
        resumed = ctx.orchestrator().resume(
            name=name, version=version, tenant=tenant, uuid=uuid, actor=CLI_ACTOR, reason=reason
        )
    click.echo(f"resumed {resumed.label()} (paused since {format_time(resumed.since)})")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def pauses(ctx: Context, as_json: bool) -> None:
    """The pauses in force: what, since when, by whom and why."""
    with reported(ctx):
        found = ctx.orchestrator().pauses()
    if as_json:
        echo_json([p.to_dict() for p in found])
        return
    if not found:
        click.echo("nothing is paused")
        return
    for p in found:
        click.echo(f"{p.label()}  since {format_time(p.since)}  {p.describe()}")
