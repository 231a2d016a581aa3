"""Async hooks on every backend: the hooks run on the worker's loop thread while the pass's
threads store their transitions, and a message read from inside an async hook is consumed once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from prorch import OnContinueMixin, OnStartMixin, Orchestrator, Pipeline, Step, register_pipeline, register_step
from prorch.model.registry import isolated_registry
from repositories.sql import SQLBackend


def test_async_hooks_finish_on_every_backend(backend: Any) -> None:
    with isolated_registry() as registry:

        @register_step
        class Ask(OnStartMixin, OnContinueMixin, Step):
            name = "Ask"

            async def on_start(self) -> None:
                await asyncio.sleep(0.01)
                self.metadata["asked"] = True
                self.wait(seconds=3600)

            async def on_continue(self) -> None:
                answer = self.receive("answer")
                if answer is None:
                    self.wait(seconds=3600)
                    return
                await asyncio.sleep(0.01)
                self.finish({"answer": answer})

        @register_step
        class Tell(OnStartMixin, Step):
            name = "Tell"

            async def on_start(self) -> None:
                await asyncio.sleep(0.01)
                self.finish({"told": self.outputs["Ask"]["answer"] * 2})

        @register_pipeline
        class Conversation(Pipeline):
            name = "Conversation"
            steps = [Ask, Tell]

        with Orchestrator(backend, registry=registry, concurrency=4) as orchestrator:
            runs = [Conversation.create(backend) for _ in range(8)]
            orchestrator.execute_pipelines()
            for index, run in enumerate(runs):
                orchestrator.send(run.uuid, "answer", index)
            orchestrator.execute_pipelines()
            for index, run in enumerate(runs):
                state = orchestrator.get(run.uuid)
                assert state.pipeline.status.value == "finished", state
                assert [s.output for s in state.steps] == [{"answer": index}, {"told": index * 2}]
                assert state.steps[0].metadata == {"asked": True}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_more_pipelines_at_once_than_pooled_connections(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Regression: each pass thread held its connections through its hooks, so concurrency
    above the pool's size (5 + 10) waited on the pool and failed the pipelines after its timeout."""
    url = f"sqlite:///{tmp_path / 'p.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    backend = SQLBackend(url, pool_timeout=3)
    with isolated_registry() as registry:

        @register_step
        class Slow(OnStartMixin, Step):
            name = "Slow"

            async def on_start(self) -> None:
                await asyncio.sleep(0.5)

        @register_step
        class SlowSync(OnStartMixin, Step):
            name = "SlowSync"

            def on_start(self) -> None:
                time.sleep(0.5)

        @register_step
        class SlowAgain(Slow):
            name = "SlowAgain"

        @register_pipeline
        class Wide(Pipeline):
            name = "Wide"
            steps = [Slow, SlowSync, SlowAgain]

        runs = Wide.create_many(backend, [{}] * 40)
        with Orchestrator(backend, registry=registry, concurrency=40, batch_size=40) as orchestrator:
            summary = orchestrator.execute_pipelines()
        assert summary.errors == {}
        assert summary.finished == 40
        assert {orchestrator.get(run.uuid).pipeline.status.value for run in runs} == {"finished"}
    backend.dispose()
