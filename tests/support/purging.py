"""An orchestrator for a test of retention, or a skip where the repository cannot delete."""

from __future__ import annotations

from typing import Any

import pytest

from prorch import ConfigurationError, FakeClock, Orchestrator


def purging_orchestrator(backend: Any, clock: FakeClock) -> Orchestrator:
    """An orchestrator on ``backend`` and ``clock`` that can purge; the test is skipped where the
    repository cannot delete (a user's four-method one: nothing is ever purged there)."""
    orchestrator = Orchestrator(backend, clock=clock)
    try:
        orchestrator.store.deleters()
    except ConfigurationError:
        pytest.skip("this repository cannot delete: nothing is ever purged")
    return orchestrator
