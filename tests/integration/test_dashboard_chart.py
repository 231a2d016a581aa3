"""The overview's "ended in the last hour" chart (``prorch.dashboard.views.overview``)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

pytest.importorskip("starlette")

from prorch import Orchestrator
from prorch.dashboard.views import CHART_MINUTES, StatsCache, overview
from prorch.model.clock import FakeClock
from prorch.model.registry import Registry
from tests.support.builders import pipeline_of, step_of

ENDED_AT = datetime(2030, 1, 1, 12, 0, 30, tzinfo=timezone.utc)


def test_a_pipeline_that_ended_after_the_counts_time_is_in_the_last_minute(tmp_path: Path, registry: Registry) -> None:
    """Regression (a browser test failed in CI): the counts take ``now`` and then read; a
    pipeline that ended in between was counted as finished but left out of the chart (its age
    came out as -1 minute), so the chart had no bar while the card said 4 finished."""
    url = f"sqlite:///{tmp_path / 'chart.db'}"
    pipeline = pipeline_of(step_of("Only", lambda self: None))
    pipeline.create(url, registry=registry)
    worker = Orchestrator(url, registry=registry, clock=FakeClock(ENDED_AT))
    assert worker.execute_pipelines().finished == 1
    dashboard = Orchestrator(url, registry=registry, clock=FakeClock(ENDED_AT - timedelta(seconds=2)))
    data = overview(dashboard, StatsCache(dashboard))
    assert data["by_status"]["finished"] == 1
    assert len(data["last_hour"]) == CHART_MINUTES
    assert data["last_hour"][-1]["finished"] == 1
    assert sum(minute["finished"] for minute in data["last_hour"]) == 1
