"""The backup example of the prorch 1.0.1 README, end to end: slow external work is simulated
with ``wait`` so that you can watch each step resume across passes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from pydantic import BaseModel

from prorch.mixins import OnContinueMixin, OnStartMixin
from prorch.pipeline import Pipeline
from prorch.registry import Registry
from prorch.step import Step

JOB_SECONDS = 2.0  # how long each simulated external job takes
POLL_SECONDS = 0.5

Echo = Callable[[str], None]
echo: Echo = print


class BackupParams(BaseModel):
    path: str = "/var/lib/app"


class ExternalJobStep(OnStartMixin, OnContinueMixin, Step):
    """Starts a (simulated) external job in on_start and polls it in on_continue."""

    verb = "working"

    def on_start(self) -> None:
        ready = self.now + timedelta(seconds=JOB_SECONDS)
        self.metadata["job_id"] = self.idempotency_key
        self.metadata["ready_at"] = ready.isoformat()
        echo(f"  {self.name}: started job {self.metadata['job_id'][:15]}... ({self.verb})")

    def on_continue(self) -> None:
        if self.now.isoformat() < self.metadata["ready_at"]:
            echo(f"  {self.name}: job still running, checking again in {POLL_SECONDS}s")
            self.wait(seconds=POLL_SECONDS)
            return
        self.finish(output=self.result())
        echo(f"  {self.name}: done -> {self.result()}")

    def result(self) -> dict[str, str]:
        return {}


class BackupGeneration(ExternalJobStep):
    name = "BackupGeneration"
    verb = "dumping the database"

    def result(self) -> dict[str, str]:
        return {"file": f"{self.params.path}/backup-{self.pipeline_uuid[:8]}.tar.gz"}


class BackupTransfer(ExternalJobStep):
    name = "BackupTransfer"
    verb = "copying to secure storage"

    def result(self) -> dict[str, str]:
        return {"location": "s3://backups/" + self.outputs["BackupGeneration"]["file"].rsplit("/", 1)[-1]}


class ProcessCompletionNotification(OnStartMixin, Step):
    name = "ProcessCompletionNotification"

    def on_start(self) -> None:
        echo(f"  {self.name}: notified the team: backup stored at {self.outputs['BackupTransfer']['location']}")


class BackupAutomationPipeline(Pipeline):
    name = "BackupAutomationPipeline"
    steps = [BackupGeneration, BackupTransfer, ProcessCompletionNotification]
    Params = BackupParams


def register(registry: Registry) -> type[Pipeline]:
    """Register the demo's classes in ``registry`` (the demo keeps them out of your app's)."""
    for step in BackupAutomationPipeline.steps:
        registry.add_step(step)
    registry.add_pipeline(BackupAutomationPipeline)
    return BackupAutomationPipeline
