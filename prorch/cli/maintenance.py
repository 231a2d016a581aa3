"""The operator's commands: ``purge`` (retention by hand) and ``config`` (the settings in effect)."""

from __future__ import annotations

import json
from typing import Any

import click

from prorch.bulk import BulkAction, any_filter
from prorch.cli.bulk import bulk_exit, filter_options, run_bulk
from prorch.cli.helpers import (
    Context,
    reported,
)
from prorch.cli.output import (
    echo_json,
    print_table,
)
from prorch.model.secrets import redact_url
from prorch.storage.listing import parse_age


@click.command()
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
@filter_options(with_status=False, run_options=False)
@click.pass_obj
def purge(ctx: Context, /, older_than: str, statuses: tuple[str, ...], batch_size: int, dry_run: bool, yes: bool,
          **filters: Any) -> None:  # fmt: skip
    """Delete ended pipelines older than --older-than, with their steps, events and messages,
    in short batches (running workers wait at most one batch). Filters (--name, --tenant, ...)
    narrow it to the pipelines they match."""
    with reported(ctx):
        age = parse_age(older_than, "--older-than")
        chosen = statuses or ("finished", "cancelled")
        if any_filter(filters.values()):
            action = BulkAction("purge", older_than=age, statuses=tuple(chosen))
            bulk_exit(run_bulk(ctx, action, filters, dry_run=dry_run, yes=yes, batch_size=min(batch_size, 1_000)))
        summary = ctx.orchestrator().purge(age, chosen, batch_size=batch_size, dry_run=dry_run)
    what = ", ".join(chosen)
    if dry_run:
        click.echo(f"would purge {summary.pipelines} pipelines ({what}) older than {older_than}")
    else:
        click.echo(
            f"purged {summary.pipelines} pipelines ({what}) older than {older_than} in {summary.batches} "
            f"batches (longest {summary.longest_batch_seconds:.3f}s)"
        )


@click.command(name="config")
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
