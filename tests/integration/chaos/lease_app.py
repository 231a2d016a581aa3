"""The application of the lease race test (#25): pipelines of three steps whose 3 ms hooks log
their pid, start and end to an append-only file, as ``chaos_app`` does."""

from __future__ import annotations

import time

from chaos_app import log

from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step


class Brief(OnStartMixin, Step):
    def on_start(self) -> None:
        log("S", self)
        time.sleep(0.003)
        log("E", self)


@register_step
class LeaseA(Brief):
    name = "LeaseA"


@register_step
class LeaseB(Brief):
    name = "LeaseB"


@register_step
class LeaseC(Brief):
    name = "LeaseC"


@register_pipeline
class LeasePipeline(Pipeline):
    name = "LeasePipeline"
    steps = [LeaseA, LeaseB, LeaseC]


@register_step
class Outlast(OnStartMixin, Step):
    """Runs longer than its worker's lease (``params['seconds']``): the lease lives by renewals."""

    name = "Outlast"

    def on_start(self) -> None:
        log("S", self)
        time.sleep(float(self.params["seconds"]))
        log("E", self)


@register_step
class OutlastAgain(Outlast):
    name = "OutlastAgain"


@register_pipeline
class Outlasting(Pipeline):
    name = "Outlasting"
    steps = [Outlast, OutlastAgain]
