"""The ``prorch`` command, a thin shell over the library: ``commands`` (the click group), the
commands by group (``running``, ``reading``, ``acting``, ``maintenance``), ``helpers``
(settings, errors and exit codes, shared options), ``output`` (tables, states, JSON) and
``demo`` (the backup example)."""

from prorch.cli.commands import main
from prorch.cli.output import pipeline_schema

__all__ = ["main", "pipeline_schema"]
