"""The backup example of the prorch 1.0.1 README, end to end: slow external work is simulated
with ``wait`` so that you can watch each step resume across passes."""

from __future__ import annotations

import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import click
from pydantic import BaseModel

from prorch.cli.helpers import Context, reported
from prorch.cli.output import print_state
from prorch.display import step_limits
from prorch.model.mixins import OnContinueMixin, OnStartMixin
from prorch.model.registry import Registry, isolated_registry
from prorch.model.status import TERMINAL, Status
from prorch.model.step import Step
from prorch.orchestrator import Orchestrator
from prorch.pipeline import Pipeline
from prorch.storage.store import resolve_backend

JOB_SECONDS = 2.0  # how long each simulated external job takes
POLL_SECONDS = 0.5


class BackupParams(BaseModel):
    path: str = "/var/lib/app"


class ExternalJobStep(OnStartMixin, OnContinueMixin, Step):
    """Starts a (simulated) external job in on_start and polls it in on_continue."""

    verb = "working"

    def on_start(self) -> None:
        ready = self.now + timedelta(seconds=JOB_SECONDS)
        self.metadata["job_id"] = self.idempotency_key
        self.metadata["ready_at"] = ready.isoformat()
        click.echo(f"  {self.name}: started job {self.metadata['job_id'][:15]}... ({self.verb})")

    def on_continue(self) -> None:
        if self.now.isoformat() < self.metadata["ready_at"]:
            left = (datetime.fromisoformat(self.metadata["ready_at"]) - self.now).total_seconds()
            self.progress(round(JOB_SECONDS - left, 1), JOB_SECONDS, note=self.verb)  # shown by prorch show
            click.echo(f"  {self.name}: job still running, checking again in {POLL_SECONDS}s")
            self.wait(seconds=POLL_SECONDS)
            return
        self.progress(JOB_SECONDS, JOB_SECONDS, note="done")
        self.finish(output=self.result())
        click.echo(f"  {self.name}: done -> {self.result()}")

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
        click.echo(f"  {self.name}: notified the team: backup stored at {self.outputs['BackupTransfer']['location']}")


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


def run(ctx: Context, url: str | None) -> bool:
    """Create the demo pipeline on ``url`` (default: a temporary SQLite file), run passes until it
    ends, print its state and history; True when it finished."""
    with tempfile.TemporaryDirectory(prefix="prorch-demo-") as folder, isolated_registry() as registry:
        url = url or f"sqlite:///{Path(folder) / 'demo.db'}"
        with reported(ctx):
            pipeline_cls = register(registry)
            backend = resolve_backend(url)  # one store shared by create() and the orchestrator
            orchestrator = Orchestrator(backend, registry=registry)
            click.echo(f"prorch demo on {url}")
            created = pipeline_cls.create(backend, {"path": "/var/lib/app"})
            click.echo(f"created {pipeline_cls.name} {created.uuid}; resuming it pass by pass:")
            started = time.monotonic()
            passes = 0
            while orchestrator.get(created.uuid).pipeline.status not in TERMINAL:
                passes += 1
                orchestrator.execute_pipelines()
                time.sleep(POLL_SECONDS / 2)
            state = orchestrator.get(created.uuid)
            history = orchestrator.history(created.uuid)
        click.echo(f"\n{passes} passes in {time.monotonic() - started:.1f}s; final state:")
        print_state(state, history, orchestrator.clock.now(), step_limits(orchestrator.registry, state.steps))
    return state.pipeline.status == Status.FINISHED
