"""A process that creates pipelines by key in lockstep with others (for test_creation_keys and
test_singletons), and the app its worker runs (``--app tests.integration.key_race``)."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel

from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step


@register_step
class KeyRaceStep(OnStartMixin, Step):
    name = "KeyRaceStep"

    def on_start(self) -> None:
        pass


@register_pipeline
class KeyRacePipeline(Pipeline):
    name = "KeyRacePipeline"
    steps = [KeyRaceStep]


class Batch(BaseModel):
    ids: list[int]


@register_step
class BatchStep(OnStartMixin, Step):
    name = "BatchStep"

    def on_start(self) -> None:
        time.sleep(0.1)  # a while for a create to land on a pipeline that has started
        self.finish({"ids": self.params.ids})  # what it ran with: no create's ids may be missing


@register_pipeline
class BatchPipeline(Pipeline):
    """Debounced: the creates of one window merge their ids, so a lost update shows as a lost id."""

    name = "BatchPipeline"
    steps = [BatchStep]
    Params = Batch

    @classmethod
    def merge(cls, old_params: dict[str, Any], new_params: dict[str, Any]) -> dict[str, Any]:
        return {"ids": sorted(set(old_params["ids"]) | set(new_params["ids"]))}


def debounce_in_lockstep(url: str, me: int, barrier: Any, results: Any, rounds: int, stream: int) -> None:
    """In lockstep with the other processes, ``rounds`` debounced creates of key "burst" (window
    4 s), then ``2 * rounds`` creates of key "single" with ``if_running="attach"``; then
    ``stream`` creates of key "stream" (window 0.2 s) at random moments, so that some land while
    a worker claims the pipeline. Each reports (key, id, uuid, created, the due time it stored,
    error)."""
    import random
    from datetime import timedelta

    from repositories import from_url

    backend = from_url(url)
    jitter = random.Random(me)

    def create(key: str, number: int, window: float) -> None:
        try:
            made = BatchPipeline.create(backend, {"ids": [number]}, key=key, debounce=timedelta(seconds=window))
            results.put((key, number, made.uuid, made.created, made.record.next_run_at, None))
        except Exception as exc:  # reported to the test, which fails on it
            results.put((key, number, None, None, None, f"{type(exc).__name__}: {exc}"))

    for round_ in range(rounds):
        barrier.wait(timeout=60)
        create("burst", me * 1000 + round_, 4.0)
    for _ in range(rounds * 2):  # attach while the worker ends the key's pipelines
        barrier.wait(timeout=60)
        try:
            made = KeyRacePipeline.create(backend, {"order": me}, key="single", if_running="attach")
            results.put(("single", me, made.uuid, made.created, None, None))
        except Exception as exc:
            results.put(("single", me, None, None, None, f"{type(exc).__name__}: {exc}"))
        time.sleep(jitter.uniform(0.05, 0.15))
    for n in range(stream):
        time.sleep(jitter.uniform(0.1, 0.6))
        create("stream", me * 1000 + 100 + n, 0.2)


def create_in_lockstep(url: str, keys: list[str], barrier: Any, results: Any, by: str = "key") -> None:
    """For each key: wait for the others at the barrier, then create it, with ``key=`` or, by
    ``"uuid"``, with a uuid made from it; report what happened."""
    import uuid as uuid_module

    from repositories import from_url

    backend = from_url(url)
    for key in keys:
        barrier.wait(timeout=60)
        try:
            if by == "uuid":
                given = str(uuid_module.uuid5(uuid_module.NAMESPACE_URL, key))
                made = KeyRacePipeline.create(backend, {"order": key}, uuid=given)
            else:
                made = KeyRacePipeline.create(backend, {"order": key}, key=key)
            results.put((key, made.uuid, made.created, None))
        except Exception as exc:  # reported to the test, which fails on it
            results.put((key, None, None, f"{type(exc).__name__}: {exc}"))


def mixed_modes_in_lockstep(url: str, me: int, barrier: Any, results: Any, rounds: int) -> None:
    """In lockstep with three other processes, ``rounds`` creates of key ``mixed-N``: processes
    0 and 1 with ``if_running="attach"``, 2 and 3 in the default mode. Reports (key, uuid, error)."""
    from repositories import from_url

    backend = from_url(url)
    mode = "attach" if me < 2 else "same"
    for n in range(rounds):
        key = f"mixed-{n}"
        barrier.wait(timeout=60)
        try:
            made = KeyRacePipeline.create(backend, {}, key=key, if_running=mode)  # type: ignore[arg-type]
            results.put((key, made.uuid, None))
        except Exception as exc:  # reported, not raised: the test says which
            results.put((key, None, f"{type(exc).__name__}: {exc}"))


@register_pipeline
class ConcatPipeline(Pipeline):
    """Debounced, with a merge that is not idempotent (it concatenates): a merge applied twice for
    one create shows as an id twice, a lost one as an id missing."""

    name = "ConcatPipeline"
    steps = [BatchStep]
    Params = Batch

    @classmethod
    def merge(cls, old_params: dict[str, Any], new_params: dict[str, Any]) -> dict[str, Any]:
        return {"ids": [*old_params["ids"], *new_params["ids"]]}


def debounce_and_attach_in_lockstep(url: str, me: int, barrier: Any, results: Any, rounds: int) -> None:
    """In lockstep with the other processes, ``rounds`` times: a debounced create of key "merged"
    (window an hour: every create merges) and an ``if_running="attach"`` create of key "attached".
    Reports (key, id, uuid, created, error)."""
    from datetime import timedelta

    from repositories import from_url

    backend = from_url(url)
    for round_ in range(rounds):
        number = me * 1000 + round_
        barrier.wait(timeout=60)
        for key in ("merged", "attached"):
            try:
                if key == "merged":
                    made = ConcatPipeline.create(backend, {"ids": [number]}, key=key, debounce=timedelta(hours=1))
                else:
                    made = ConcatPipeline.create(backend, {"ids": [me]}, key=key, if_running="attach")
                results.put((key, number, made.uuid, made.created, None))
            except Exception as exc:  # reported to the test, which fails on it
                results.put((key, number, None, None, f"{type(exc).__name__}: {exc}"))
