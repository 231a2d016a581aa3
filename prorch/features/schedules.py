"""Schedules as an extension: at the start of each pass, create the pipelines whose ticks have
come (``prorch.scheduling``). A schedule's failure is an error of the pass, as before."""

from __future__ import annotations

from prorch import scheduling
from prorch.extension import Extension, Host, PassReport


class Schedules(Extension):
    """Creates due scheduled pipelines before each pass claims."""

    def setup(self, host: Host) -> None:
        self.host = host

    def on_pass_start(self, summary: PassReport) -> None:
        created, failed = scheduling.create_due(self.host.store, self.host.registry, self.host.clock)
        summary.scheduled += created
        summary.errors.update(failed)
