"""``postgres://`` (the scheme libpq, Heroku and the ``postgres`` extra's name use) opens the same
PostgreSQL backend as ``postgresql://``, on the real server the fixtures start (#31)."""

from __future__ import annotations

import pytest

from prorch import Orchestrator, Status
from prorch.model.registry import Registry
from repositories import from_url
from repositories.postgresql import PostgreSQLBackend
from tests.support.builders import pipeline_of, quick


@pytest.mark.parametrize("scheme", ["postgres://", "postgres+psycopg://"])
def test_postgres_scheme_runs_a_pipeline(postgres_url: str, scheme: str, registry: Registry) -> None:
    url = postgres_url.replace("postgresql://", scheme, 1)
    backend = from_url(url)
    assert isinstance(backend, PostgreSQLBackend)
    pipeline = pipeline_of(quick("Only"))
    created = pipeline.create(backend, {})
    orchestrator = Orchestrator(backend, registry=registry)
    orchestrator.execute_pipelines()
    assert orchestrator.get(created.uuid).pipeline.status == Status.FINISHED
    backend.dispose()
