"""The ``prorch`` command: a thin shell over the library.

Settings come from defaults < ``prorch.toml`` / ``[tool.prorch]`` < ``PRORCH_*`` < flags
(``prorch config`` shows the result). Exit codes: 0 ok, 1 an operation failed, 2 a usage or
configuration error. Errors are one line on stderr; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

from typing import Any

import click

from prorch.cli import acting, evolution, maintenance, reading, running
from prorch.cli.helpers import Context


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


main.add_command(running.run)
main.add_command(running.worker)
main.add_command(running.dashboard)
main.add_command(running.demo)
main.add_command(reading.list_pipelines)
main.add_command(reading.show)
main.add_command(reading.wait)
main.add_command(reading.stream)
main.add_command(reading.schema)
main.add_command(reading.schedules)
main.add_command(acting.start)
main.add_command(acting.cancel)
main.add_command(acting.retry)
main.add_command(acting.rerun)
main.add_command(acting.send)
main.add_command(acting.pause)
main.add_command(acting.resume)
main.add_command(acting.pauses)
main.add_command(maintenance.purge)
main.add_command(maintenance.show_config)
main.add_command(reading.workers)
main.add_command(evolution.versions)
main.add_command(evolution.export)
main.add_command(evolution.replay)
