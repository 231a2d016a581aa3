"""The commands for changing code safely: ``versions`` (which class versions and patches still
have live pipelines), ``export`` (recorded pipelines to a file) and ``replay`` (check recorded
pipelines against the code loaded with ``--app``; exit 1 when one would not run as recorded)."""

from __future__ import annotations

import sys

import click

from prorch.cli.helpers import Context, reported
from prorch.cli.output import echo_json, print_table
from prorch.display import format_time
from prorch.model.exceptions import ConfigurationError, InvalidParamsError
from prorch.model.registry import current_registry
from prorch.storage import replay as replaying
from prorch.storage.versions import VersionUsage, advice


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def versions(ctx: Context, as_json: bool) -> None:
    """Per pipeline class and version: live (not ended) pipelines, the oldest one's creation time,
    ended ones, and per patch the live pipelines that predate it: the code you can delete. With
    --app, also which versions and patches your code declares."""
    with reported(ctx):
        orchestrator = ctx.orchestrator()
        found = orchestrator.versions(workers_code=ctx.has_app())
    if as_json:
        echo_json({"versions": [usage.to_json() for usage in found]})
        return
    if not found:
        click.echo("no pipelines stored")
        return
    print_table(_rows(found))
    for line in (line for usage in found for line in advice(usage)):
        click.echo(line)


def _rows(found: list[VersionUsage]) -> list[list[str]]:
    rows = [
        ["PIPELINE", "VERSION", "LIVE", "OLDEST LIVE", "ENDED", "CODE HERE", "PATCHES (live with it / predating it)"]
    ]
    for usage in found:
        code = {True: "yes", False: "missing", None: "-"}[usage.registered]
        patches = ", ".join(
            f"{p.id}{' (deprecated)' if p.declared == 'deprecated_patches' else ''} {p.live_with}/{p.live_without}"
            for p in usage.patches
        )
        oldest = format_time(usage.oldest_live) if usage.oldest_live is not None else "-"
        rows.append([usage.name, f"v{usage.version}", str(usage.live), oldest, str(usage.ended), code, patches or "-"])
    return rows


@click.command()
@click.argument("uuids", nargs=-1, required=True, metavar="UUID...")
@click.pass_obj
def export(ctx: Context, uuids: tuple[str, ...]) -> None:
    """Write the recorded pipelines (each with its steps and events) as JSON on stdout, for
    `prorch replay --file` or a bug report. Reads only."""
    with reported(ctx):
        store = ctx.orchestrator().store
        document = replaying.export(replaying.from_store(store, uuids=list(uuids)))
    echo_json(document)


@click.command()
@click.option("--from", "source", metavar="URL", help="Store to read (default: the configured repository).")
@click.option("--file", "path", type=click.Path(dir_okay=False), help="A file `prorch export` wrote, instead.")
@click.option("--all", "include_ended", is_flag=True, help="Check ended pipelines too (default: live ones).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def replay(ctx: Context, source: str | None, path: str | None, include_ended: bool, as_json: bool) -> None:
    """Check recorded pipelines against the code loaded with --app: each one's class and steps
    still load and line up, its params validate, its finished steps' outputs validate, its
    patches are declared. Runs no hook, writes nothing. Exit 1 and a report when any pipeline
    would not run as recorded (a CI gate)."""
    with reported(ctx):
        if not ctx.has_app():
            raise ConfigurationError("replay checks recorded pipelines against your code: give --app MODULE")
        if source is not None and path is not None:
            raise InvalidParamsError("give --from URL or --file PATH, not both")
        if path is not None:
            ctx.loaded()
            ctx.import_apps()
            histories: list[replaying.History] = replaying.from_export(path, include_ended=include_ended)
            report = replaying.replay(histories, current_registry())
        else:
            orchestrator = ctx.orchestrator(repository=source) if source is not None else ctx.orchestrator()
            found = replaying.from_store(orchestrator.store, include_ended=include_ended)
            report = replaying.replay(found, orchestrator.registry)
    if as_json:
        echo_json(report.to_json())
    else:
        click.echo(report.text())
    sys.exit(0 if report.ok else 1)
