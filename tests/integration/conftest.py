from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from repositories import from_url
from tests.support.seed_repository import seed_backend

BACKENDS = ["memory", "sqlite", "seed"]


def make_backend(kind: str, tmp_path: Path) -> Any:
    if kind == "memory":
        return from_url("memory://")
    if kind == "sqlite":
        return from_url(f"sqlite:///{tmp_path / 'prorch.db'}")
    if kind == "seed":
        return seed_backend(str(tmp_path / "seed.json"))
    raise AssertionError(kind)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    made = make_backend(request.param, tmp_path)
    yield made
    if hasattr(made, "dispose"):
        made.dispose()
