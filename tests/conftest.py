from __future__ import annotations

from collections.abc import Iterator

import pytest

from prorch.model.registry import Registry, isolated_registry
from prorch.testing import Harness


@pytest.fixture
def registry() -> Iterator[Registry]:
    """A fresh registry, so each test declares its own pipelines and steps."""
    with isolated_registry() as fresh:
        yield fresh


@pytest.fixture
def harness(registry: Registry) -> Harness:
    return Harness(registry=registry)
