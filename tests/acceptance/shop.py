"""The app the acceptance tests start the real `prorch` executable with (--app shop)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel

from prorch import OnContinueMixin, OnStartMixin, Pipeline, Step, register_pipeline, register_step


class Reservation(BaseModel):
    item: str
    qty: int


@register_step
class Reserve(OnStartMixin, Step):
    name = "Reserve"
    Output = Reservation

    def on_start(self) -> None:
        self.finish(Reservation(item=self.params.item, qty=self.params.qty))


@register_step
class Charge(OnStartMixin, Step):
    name = "Charge"

    def on_start(self) -> None:
        flag = os.environ.get("SHOP_DECLINE_FILE")
        if flag and Path(flag).exists():
            self.fail("card declined")


@register_step
class Ship(OnStartMixin, OnContinueMixin, Step):
    name = "Ship"

    def on_start(self) -> None:
        marker = os.environ.get("SHOP_SLOW_MARKER")
        if marker:  # a slow hook, for the SIGTERM test
            Path(marker + ".start").write_text(str(os.getpid()))
            time.sleep(2)
            Path(marker + ".end").write_text("done")

    def on_cancel(self) -> None:
        hold = os.environ.get("SHOP_CANCEL_HOLD")
        if hold:  # a cancel hook that waits for the test's word (up to 20 s), for the dashboard test
            Path(hold + ".start").write_text(str(os.getpid()))
            deadline = time.monotonic() + 20
            while not Path(hold + ".release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            Path(hold + ".end").write_text("released")

    def on_continue(self) -> None:
        if self.params.item == "slowpoke" and self.receive("ship_now") is None:
            self.log.info("no ship_now yet for %s", self.params.item)
            self.progress(1, 4, note="in transit")
            self.wait(seconds=3600)
        else:
            self.finish({"tracking": f"TRK-{self.pipeline_uuid[:6]}"})


@register_pipeline
class Order(Pipeline):
    name = "Order"
    steps = [Reserve, Charge, Ship]

    class Params(BaseModel):
        item: str
        qty: int = 1
