"""The pipeline of ``bulk_retry.py`` (``--app bulk_app``, with tests/benchmarks on the path): one
step, one attempt, whose hook fails while the file ``$BULK_FIXED`` is absent and finishes once it
exists. Every call appends ``<pipeline uuid> ok|fail`` to ``$BULK_LOG``, so the benchmark can
count the hooks run after the retry, per pipeline."""

from __future__ import annotations

import os
from pathlib import Path

from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step


@register_step
class BulkFlaky(OnStartMixin, Step):
    name = "BulkFlaky"
    max_attempts = 1

    def on_start(self) -> None:
        fixed = Path(os.environ["BULK_FIXED"]).exists()
        with Path(os.environ["BULK_LOG"]).open("a") as log:  # one short line: appended whole
            log.write(f"{self.pipeline_uuid} {'ok' if fixed else 'fail'}\n")
        if not fixed:
            self.fail("not fixed yet")
        else:
            self.finish({"ok": True})


@register_pipeline
class BulkFlakes(Pipeline):
    name = "BulkFlakes"
    steps = [BulkFlaky]
