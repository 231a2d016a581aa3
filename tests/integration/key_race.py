"""A process that creates pipelines by key in lockstep with others (for test_creation_keys)."""

from __future__ import annotations

from typing import Any

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
