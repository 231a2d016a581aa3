"""The dashboard's single actions (``prorch.dashboard.acting.act``) on the in-memory store."""

from __future__ import annotations

import pytest

from prorch import Orchestrator
from prorch.dashboard import acting
from prorch.model.exceptions import InvalidStateError
from prorch.model.registry import Registry
from repositories.memory import MemoryBackend
from tests.support.builders import pipeline_of, quick


@pytest.mark.parametrize("tenant", [1.5, True, {"id": 1}])
def test_a_tenant_no_pause_can_hold_is_refused_not_paused_for_show(registry: Registry, tenant: object) -> None:
    """Regression (review of #29): a tenant in the context that is not a text or an integer
    (a float, a bool, an object) is held by no tenant's pause (``pauses.tenant_text``); the
    dashboard's pause-tenant stored a pause of its ``str()`` and said "paused tenant 1.5", while
    the tenant's pipelines went on running."""
    backend = MemoryBackend()
    job = pipeline_of(quick("Work"), name="Job")
    uuid = job.create(backend, {}, context={"tenant": tenant}).uuid
    orchestrator = Orchestrator(backend, registry=registry)
    with pytest.raises(InvalidStateError, match="no tenant"):
        acting.act(orchestrator, uuid, "pause-tenant", {"confirm": "yes"}, "tester")
    assert orchestrator.store.pauses() == []


def test_an_integer_tenant_is_paused_as_text(registry: Registry) -> None:
    backend = MemoryBackend()
    job = pipeline_of(quick("Work"), name="Job")
    uuid = job.create(backend, {}, context={"tenant": 7}).uuid
    orchestrator = Orchestrator(backend, registry=registry)
    acting.act(orchestrator, uuid, "pause-tenant", {"confirm": "yes"}, "tester")
    assert [(p.kind, p.value) for p in orchestrator.store.pauses()] == [("tenant", "7")]
    assert orchestrator.query(state="paused").pipelines[0].uuid == uuid
