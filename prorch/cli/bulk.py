"""The filters ``cancel``, ``retry``, ``rerun`` and ``purge`` share with ``list``, and the run
of a bulk action: the count first, a confirmation above ``CONFIRM_ABOVE``, a progress bar on
stderr, and a summary."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from prorch.bulk import LISTING_FILTERS, BulkAction, BulkSummary, Filters, any_filter, count
from prorch.cli.helpers import STATUSES, Context, parse_attributes, parse_param_filter
from prorch.model.exceptions import InvalidParamsError
from prorch.model.substates import STATES
from prorch.storage.listing import parse_moment

CONFIRM_ABOVE = 10
"""A bulk action on more pipelines than this asks first (``--yes`` does not)."""

FILTERS = (*LISTING_FILTERS, "updated_since", "updated_until", "attrs")
PAST_TENSE = {"cancel": "cancelled", "retry": "retried", "rerun": "reran", "purge": "purged"}


def filter_options(
    with_status: bool = True, param_flag: str = "--param", run_options: bool = True
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The listing's filters, and the options of a bulk run (``--dry-run``, ``--yes``,
    ``--batch-size``), on a command that also takes one UUID. ``rerun`` names the params
    filter ``--match-param``: its ``--param`` changes the params."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        options = [
            click.option("--name", help="Every pipeline with this name (instead of one UUID)."),
            click.option("--version", "version", type=int, help="... of this version."),
            click.option("--tenant", help="... of this tenant."),
            click.option("--key", help="... created with this key."),
            click.option(param_flag, "param", metavar="NAME=VALUE", help="... whose params field NAME equals VALUE."),
            click.option(
                "--attr", "attrs", multiple=True, metavar="NAME=VALUE", help="... with this search attribute."
            ),
            click.option("--since", help="... created at or after: an age (30m, 2h, 7d) or an ISO time."),
            click.option("--until", help="... created before: an age or an ISO time."),
            click.option("--updated-since", "updated_since", help="... last changed at or after this."),
            click.option("--updated-until", "updated_until", help="... last changed before this."),
            click.option("--yes", "-y", is_flag=True, help=f"Do not ask before acting on more than {CONFIRM_ABOVE}."),
        ]
        if run_options:
            options += [
                click.option("--dry-run", is_flag=True, help="Count the pipelines it would act on; change nothing."),
                click.option("--batch-size", type=click.IntRange(1, 1_000), default=100, show_default=True),
            ]
        if with_status:
            options[:0] = [
                click.option("--status", type=click.Choice(STATUSES), help="... with this status."),
                click.option("--state", type=click.Choice(STATES), help="... in this state (running, due, waiting)."),
            ]
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def split_filters(values: dict[str, Any]) -> dict[str, Any]:
    """Take the filter options out of a command's arguments (the rest stay)."""
    return {name: values.pop(name) for name in FILTERS if name in values}


def filters_from(ctx: Context, given: dict[str, Any]) -> Filters:
    now = ctx.orchestrator().clock.now()
    moments = {
        name: parse_moment(given[name], "--" + name.replace("_", "-"), now) if given.get(name) is not None else None
        for name in ("since", "until", "updated_since", "updated_until")
    }
    param = parse_param_filter(given["param"]) if given.get("param") is not None else None
    return Filters(
        status=given.get("status"), state=given.get("state"), name=given.get("name"), version=given.get("version"),
        tenant=given.get("tenant"), key=given.get("key"), param=param,
        since=moments["since"], until=moments["until"],
        updated_since=moments["updated_since"], updated_until=moments["updated_until"],
        attributes=parse_attributes(given.get("attrs")),
    )  # fmt: skip


def one_or_many(uuid: str | None, filters: dict[str, Any]) -> bool:
    """True for a bulk run (filters, no UUID); one clear error for both or neither."""
    chosen = any_filter(filters.values())
    if uuid is not None and chosen:
        raise InvalidParamsError("give one pipeline's UUID or filters (--status, --name, ...), not both")
    if uuid is None and not chosen:
        raise InvalidParamsError("give a pipeline's UUID, or filters (--status, --name, ...) for every match")
    return chosen


def run_bulk(
    ctx: Context, action: BulkAction, given: dict[str, Any], *, dry_run: bool, yes: bool, batch_size: int
) -> BulkSummary:
    """Count, confirm, act with a progress bar on stderr, and print the summary."""
    orchestrator = ctx.orchestrator()
    filters = filters_from(ctx, given)
    matching = count(orchestrator, filters)
    if dry_run:
        summary = orchestrator.bulk(action, filters, dry_run=True, batch_size=batch_size)
        click.echo(f"would {action.action} {summary.done} of {matching} matching{_skipped(summary)}")
        return summary
    if matching > CONFIRM_ABOVE and not yes:
        click.confirm(f"{action.action} up to {matching} pipelines?", abort=True, err=True)
    with click.progressbar(length=matching, label=action.action, file=sys.stderr) as bar:
        summary = orchestrator.bulk(action, filters, batch_size=batch_size, progress=bar.update)
    failed = f", {summary.failed} failed" if summary.failed else ""
    click.echo(f"{PAST_TENSE[action.action]} {summary.done} of {summary.matched} matching{_skipped(summary)}{failed}")
    for uuid, error in summary.errors.items():
        click.echo(f"  failed {uuid}: {error}", err=True)
    return summary


def _skipped(summary: BulkSummary) -> str:
    if not summary.skipped:
        return ""
    shown = "; ".join(f"{n} {reason}" for reason, n in summary.skipped_why.most_common(3))
    return f" ({summary.skipped} skipped: {shown})"


def bulk_exit(summary: BulkSummary) -> NoReturn:
    """Exit 1 when an action failed on some pipeline, else 0."""
    sys.exit(1 if summary.failed else 0)
