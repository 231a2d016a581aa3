"""Tenant plugins: per tenant, in order, signature checked at registration, discovered from
modules and entry points; a plugin's exception is the step's."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from prorch import OnStartMixin, Pipeline, RegistrationError, Step, register_pipeline, register_plugin, register_step
from prorch.features.tenant_plugins import discover
from prorch.model.registry import Registry
from prorch.testing import Harness


def declare(registry: Registry) -> type[Pipeline]:
    class Notify(OnStartMixin, Step):
        name = "Notify"
        max_attempts = 2
        plugin_points = {"format": ("text",)}

        def on_start(self) -> None:
            self.finish({"lines": self.plugins("format", text="backup done")})

    register_step(Notify)
    return register_pipeline(type("Job", (Pipeline,), {"name": "Job", "steps": [Notify]}))


def lines(harness: Harness, uuid: str) -> Any:
    return harness.orchestrator.get(uuid).steps[0].output["lines"]


def test_plugins_run_per_tenant_in_a_defined_order(harness: Harness, registry: Registry) -> None:
    job = declare(registry)

    @register_plugin(step="Notify", point="format", order=2)
    def signature(step: Step, text: str) -> str:
        return f"{text} -- ops"

    @register_plugin(step="Notify", point="format", tenant="acme")
    def acme_upper(step: Step, text: str) -> str:
        return f"[{step.tenant}] {text.upper()}"

    @register_plugin(step="Notify", point="format", order=1)
    def plain(step: Step, text: str) -> str:
        return text

    acme = harness.create(job, tenant="acme")
    other = harness.create(job, tenant="globex")
    nobody = harness.create(job)
    harness.run_pass()
    # generic plugins first (by order), then the tenant's own
    assert lines(harness, acme.uuid) == ["backup done", "backup done -- ops", "[acme] BACKUP DONE"]
    assert lines(harness, other.uuid) == ["backup done", "backup done -- ops"]
    assert lines(harness, nobody.uuid) == ["backup done", "backup done -- ops"]


def test_a_plugin_that_cannot_take_the_points_arguments_is_rejected(registry: Registry) -> None:
    declare(registry)
    with pytest.raises(RegistrationError, match="cannot take point 'format'"):

        @register_plugin(step="Notify", point="format")
        def wrong(step: Step, message: str) -> str:
            return message

    with pytest.raises(RegistrationError, match="has no plugin point 'parse'"):

        @register_plugin(step="Notify", point="parse")
        def elsewhere(step: Step, text: str) -> str:
            return text

    assert registry.plugins == []


def test_a_plugins_exception_is_the_steps_and_retries_apply(harness: Harness, registry: Registry) -> None:
    job = declare(registry)
    calls: list[int] = []

    @register_plugin(step="Notify", point="format")
    def flaky(step: Step, text: str) -> str:
        calls.append(step.attempt)
        if step.attempt == 1:
            raise ConnectionError("template server down")
        return text

    run = harness.create(job)
    assert harness.run_until_done(run.uuid) == "finished"
    assert calls == [1, 2]
    assert "step.retrying" in harness.event_types(run.uuid)


def test_plugins_are_discovered_from_modules_and_entry_points(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    declare(registry)
    (tmp_path / "acme_plugins.py").write_text(
        textwrap.dedent(
            """
            from prorch import register_plugin

            @register_plugin(step="Notify", point="format", tenant="acme")
            def acme(step, text):
                return "acme:" + text
            """
        )
    )
    (tmp_path / "globex_plugins.py").write_text(
        textwrap.dedent(
            """
            from prorch import register_plugin

            @register_plugin(step="Notify", point="format", tenant="globex")
            def globex(step, text):
                return "globex:" + text
            """
        )
    )
    dist = tmp_path / "globex_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: globex-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[prorch.plugins]\nglobex = globex_plugins\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("acme_plugins", "globex_plugins"):
        sys.modules.pop(name, None)
    loaded = discover(["acme_plugins"])
    assert loaded[0] == "acme_plugins" and "globex_plugins" in loaded
    assert sorted(p.tenant or "" for p in registry.plugins) == ["acme", "globex"]


def test_plugins_must_be_called_with_the_declared_arguments(harness: Harness, registry: Registry) -> None:
    class Bad(OnStartMixin, Step):
        name = "Bad"
        plugin_points = {"format": ("text",)}

        def on_start(self) -> None:
            self.plugins("format", message="x")

    register_step(Bad)
    run = harness.create(register_pipeline(type("B", (Pipeline,), {"name": "B", "steps": [Bad]})))
    harness.run_pass()
    error = harness.orchestrator.get(run.uuid).steps[0].error
    assert error is not None and "takes text, got message" in error.message
