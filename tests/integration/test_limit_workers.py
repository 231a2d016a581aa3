"""Concurrency and rate limits (issue #15), in the claim of every backend and with real worker
processes: four `prorch worker` processes on one store (SQLite, PostgreSQL), checked from the
hooks' own clocks. ``max_running``: never more than N at any instant, and N do run together (the
limit is not a lock that serialises them); ``max_running_per_tenant``: one tenant's pipelines
never exceed it while other tenants run beside them; ``rate_limit``: no window of the period
holds more starts than the rate allows."""

from __future__ import annotations

import bisect
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect

from prorch import Orchestrator, RegistrationError
from prorch.model.limit_rules import ClaimLimit, RateLimit
from prorch.model.registry import Registry, isolated_registry
from repositories.sql import MIGRATIONS, SQLBackend, upgrade
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of

PRORCH = str(Path(sys.executable).parent / "prorch")
APP = """
    import os
    import time
    from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step

    @register_step
    class Render(OnStartMixin, Step):
        name = "Render"

        def on_start(self):
            started = time.time()
            time.sleep(0.3)
            self.finish({"start": started, "end": time.time(), "pid": os.getpid()})

    @register_pipeline
    class Limited(Pipeline):
        name = "Limited"
        steps = [Render]
        max_running = 2

    @register_pipeline
    class Free(Pipeline):
        name = "Free"
        steps = [Render]

    @register_pipeline
    class PerTenant(Pipeline):
        name = "PerTenant"
        steps = [Render]
        max_running_per_tenant = 1

    @register_step
    class Call(OnStartMixin, Step):
        name = "Call"

        def on_start(self):
            self.finish({"start": time.time(), "end": time.time(), "pid": os.getpid()})

    @register_pipeline
    class Rated(Pipeline):
        name = "Rated"
        steps = [Call]
        rate_limit = "4/2s"
"""


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


def run_four_workers(
    url: str, tmp_path: Path, wanted: list[tuple[str, str | None]]
) -> list[tuple[str, str | None, dict[str, Any]]]:
    """Create a pipeline of each (name, tenant), run four workers until all have finished, and
    give each one's (name, tenant, output): its hook's start, end and process id."""
    (tmp_path / "render.py").write_text(textwrap.dedent(APP))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    env["PYTHONPATH"] = str(tmp_path)
    sys.path.insert(0, str(tmp_path))
    with isolated_registry() as registry:
        import render  # noqa: F401 - registers the app's pipelines here, to create them

        created = [
            (registry.pipeline(name).create(url, {}, tenant=tenant).uuid, name, tenant) for name, tenant in wanted
        ]
    sys.modules.pop("render", None)
    sys.path.remove(str(tmp_path))
    command = [PRORCH, "-r", url, "--app", "render", "worker", "--interval", "0.05", "--batch-size", "1"]
    workers = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    try:
        orchestrator = Orchestrator(url)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if all(orchestrator.store.get_pipeline(u).status.value == "finished" for u, _, _ in created):  # type: ignore[union-attr]
                break
            time.sleep(0.2)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        logs = [worker.communicate(timeout=30)[1] for worker in workers]
    outputs = [(name, tenant, orchestrator.get(uuid).steps[0].output) for uuid, name, tenant in created]
    assert all(output for _, _, output in outputs), logs
    return outputs  # type: ignore[return-value]


def runs_of(
    outputs: list[tuple[str, str | None, dict[str, Any]]], name: str, tenant: str | None = "*"
) -> list[tuple[float, float]]:
    return [(o["start"], o["end"]) for n, t, o in outputs if n == name and tenant in ("*", t)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_max_running_holds_across_four_workers(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path / 'limits.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    outputs = run_four_workers(url, tmp_path, [("Limited", None)] * 12 + [("Free", None)] * 8)
    assert most_at_once(runs_of(outputs, "Limited")) == 2
    # (not asserted: that several workers ran Limited ones. A worker whose hook ends claims again
    # at once, while idle ones look every wake_poll, so on a loaded machine one worker may run
    # them all; the limit is then still held, and test_key_limit_workers covers four at once)
    assert most_at_once(runs_of(outputs, "Limited") + runs_of(outputs, "Free")) > 2  # Free was not held back


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_tenant_and_rate_limits_hold_across_four_workers(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'limits.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    tenants = ["a", "b", "c"]
    wanted = [("PerTenant", tenant) for tenant in tenants for _ in range(4)] + [("Rated", None)] * 12
    outputs = run_four_workers(url, tmp_path, wanted)
    for tenant in tenants:
        assert most_at_once(runs_of(outputs, "PerTenant", tenant)) == 1
    assert most_at_once(runs_of(outputs, "PerTenant")) >= 2  # tenants ran beside each other
    starts = sorted(start for start, _ in runs_of(outputs, "Rated"))
    # "4/2s" counts claims; a hook starts after its claim, a few ms later on a quiet machine but
    # up to a second or two on a loaded one, where a claimed pipeline waits for a slot (seen: 5
    # starts in 1.75 s, and 7 in 1 s at load 17: two claims' fours bunched), so a 1 s window may
    # hold two claims' worth: no limit at all would start the 12 within a fraction of a second
    assert max(bisect.bisect_left(starts, start + 1.0) - i for i, start in enumerate(starts)) <= 8
    assert starts[-1] - starts[0] >= 3.5  # 12 starts at 4 per 2 s: the third four wait 4 s for room


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgresql", "tinydb"])
def test_the_claim_leaves_room_only_up_to_the_limit(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    step = step_of("Slow", None, lambda self: None)
    limited, free = pipeline_of(step, name="Limited", max_running=2), pipeline_of(step, name="Free")
    for _ in range(4):
        limited.create(backend, {})
        free.create(backend, {})
    orchestrator = Orchestrator(backend, registry=registry)
    now = orchestrator.clock.now()
    later = now + timedelta(seconds=60)
    first = orchestrator.store.claim_due(now, "w1", later, 100, {"Limited": ClaimLimit(max_running=2)})
    second = orchestrator.store.claim_due(now, "w2", later, 100, {"Limited": ClaimLimit(max_running=2)})
    assert sorted(p.name for p in first) == ["Free"] * 4 + ["Limited"] * 2 and second == []
    expired = now + timedelta(seconds=61)  # the leases ran out: room again, for 2
    third = orchestrator.store.claim_due(
        expired, "w3", expired + timedelta(seconds=60), 100, {"Limited": ClaimLimit(max_running=2)}
    )
    assert sorted(p.name for p in third) == ["Free"] * 4 + ["Limited"] * 2


def test_a_bad_limit_is_refused_at_registration(registry: Registry) -> None:
    with pytest.raises(RegistrationError, match="max_running must be a whole number of 1 or more, got 0"):
        pipeline_of(step_of("S", lambda self: None), name="Zero", max_running=0)


def test_a_repository_without_claims_still_keeps_to_the_limit_in_one_pass(
    tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend("seed", tmp_path, request)  # the 1.0.1 README's repository: no claim, one process
    step = step_of("Slow", None, lambda self: None)
    limited, free = pipeline_of(step, name="Limited", max_running=2), pipeline_of(step, name="Free")
    for _ in range(3):
        limited.create(backend, {})
        free.create(backend, {})
    orchestrator = Orchestrator(backend, registry=registry)
    now = orchestrator.clock.now()
    found = orchestrator.store.claim_due(
        now, "w1", now + timedelta(seconds=60), 100, {"Limited": ClaimLimit(max_running=2)}
    )
    assert sorted(p.name for p in found) == ["Free"] * 3 + ["Limited"] * 2


ALL_CLAIMING = ["memory", "sqlite", "postgresql", "tinydb", "seed"]


@pytest.mark.parametrize("kind", ALL_CLAIMING)
def test_max_running_per_tenant_leaves_room_to_each_tenant(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    step = step_of("Slow", None, lambda self: None)
    per_tenant = pipeline_of(step, name="PerTenant", max_running_per_tenant=1)
    crowd = [per_tenant.create(backend, {}, tenant="crowd").uuid for _ in range(30)]  # due first, all of one tenant
    alone = per_tenant.create(backend, {}, tenant="alone").uuid
    untenanted = [per_tenant.create(backend, {}).uuid for _ in range(2)]  # no tenant: one group of their own
    numeric = per_tenant.create(backend, {}, context={"tenant": 7}).uuid  # 7 is not "7"
    orchestrator = Orchestrator(backend, registry=registry)
    now = orchestrator.clock.now()
    limits = {"PerTenant": ClaimLimit(per_tenant=1)}
    first = orchestrator.store.claim_due(now, "w1", now + timedelta(seconds=60), 3, limits)
    assert sorted(p.uuid for p in first) == sorted([crowd[0], alone, untenanted[0]])  # three tenants, not 3 of crowd
    more = orchestrator.store.claim_due(now, "w2", now + timedelta(seconds=60), 100, limits)
    if kind == "seed":  # no leases without claims: each pass starts from nothing held
        return
    assert [p.uuid for p in more] == [numeric]
    assert orchestrator.store.claim_due(now, "w3", now + timedelta(seconds=60), 100, limits) == []
    with_cap = {"PerTenant": ClaimLimit(max_running=5, per_tenant=1)}  # both: the lower one wins
    later = now + timedelta(seconds=61)
    again = orchestrator.store.claim_due(later, "w4", later + timedelta(seconds=60), 100, with_cap)
    assert len(again) == 4 and len({p.context.get("tenant", "-") for p in again}) == 4


@pytest.mark.parametrize("kind", ALL_CLAIMING)
def test_rate_limit_counts_claims_within_the_period(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    step = step_of("Quick", None, lambda self: None)
    rated, free = pipeline_of(step, name="Rated", rate_limit="3/minute"), pipeline_of(step, name="Free")
    for _ in range(8):
        rated.create(backend, {})
        free.create(backend, {})
    orchestrator = Orchestrator(backend, registry=registry)
    now = orchestrator.clock.now()
    limits = {"Rated": ClaimLimit(rate=RateLimit(3, 60))}

    def claim(at: datetime, owner: str) -> list[str]:
        found = orchestrator.store.claim_due(at, owner, at + timedelta(seconds=1), 100, limits)
        return sorted(p.name for p in found)

    assert claim(now, "w1") == ["Free"] * 8 + ["Rated"] * 3
    # the leases end after 1 s (the Free ones are claimed again), but the three claims of
    # Rated still count until the minute is over
    assert claim(now + timedelta(seconds=30), "w2") == ["Free"] * 8
    assert claim(now + timedelta(seconds=60, microseconds=1), "w3") == ["Free"] * 8 + ["Rated"] * 3
    if kind != "seed":  # the count is stored with the claims: another worker's claim sees it
        other = Orchestrator(backend, registry=registry)
        found = other.store.claim_due(now + timedelta(seconds=90), "w4", now + timedelta(seconds=91), 100, limits)
        assert sorted(p.name for p in found) == ["Free"] * 8


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"max_running_per_tenant": 0}, "max_running_per_tenant must be a whole number of 1 or more, got 0"),
        ({"rate_limit": "fast"}, "rate_limit 'fast' is not a rate: write \"COUNT/PERIOD\""),
        ({"rate_limit": "0/minute"}, "rate_limit '0/minute': the count and the period must be more than 0"),
        ({"rate_limit": 100}, "rate_limit 100 is not a rate"),
    ],
)
def test_bad_limits_are_refused_at_registration(registry: Registry, attributes: dict[str, Any], message: str) -> None:
    with pytest.raises(RegistrationError, match=re.escape(message)):
        pipeline_of(step_of("S", lambda self: None), name="Bad", **attributes)


@pytest.mark.parametrize(
    ("text", "count", "seconds"),
    [
        ("100/minute", 100, 60),
        ("10/second", 10, 1),
        ("5/10s", 5, 10),
        ("1000 / 2 hours", 1000, 7200),
        ("1/day", 1, 86400),
    ],
)
def test_rates_read_as_count_per_period(text: str, count: int, seconds: float) -> None:
    assert RateLimit.parse(text) == RateLimit(count, seconds)


def test_a_rate_limited_pipeline_runs_one_hook_per_claim(tmp_path: Path, registry: Registry) -> None:
    """A claim is what the rate counts, so a claim of a rate-limited pipeline starts one hook;
    without the rule, a pass would run all three steps on one claim."""
    steps = [step_of(f"S{i}", lambda self: None) for i in range(3)]
    rated = pipeline_of(*steps, name="Rated", rate_limit="100/minute")
    free = pipeline_of(*steps, name="Free")
    url = f"sqlite:///{tmp_path / 'rate.db'}"
    limited, unlimited = rated.create(url, {}).uuid, free.create(url, {}).uuid
    orchestrator = Orchestrator(url, registry=registry)
    orchestrator.execute_pipelines()
    assert orchestrator.get(unlimited).pipeline.status.value == "finished"
    assert [s.status.value for s in orchestrator.get(limited).steps] == ["finished", "created", "created"]
    for _ in range(2):
        orchestrator.execute_pipelines()
    assert orchestrator.get(limited).pipeline.status.value == "finished"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_migration_0012_adds_the_rate_table_and_takes_it_back(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    old = SQLBackend(url, migrate=False)
    upgrade(old, "0011")
    old.dispose()
    rated = pipeline_of(step_of("Quick", None, lambda self: None), name="Rated", rate_limit="1/hour")
    for _ in range(2):
        rated.create(url, {})  # opening the store upgrades it
    orchestrator = Orchestrator(url, registry=registry)
    assert orchestrator.execute_pipelines().claimed == 1  # one start an hour: the claim counted it
    assert orchestrator.execute_pipelines().claimed == 0
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as connection:
        assert "rate_limit_starts" in inspect(connection).get_table_names()
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.downgrade(config, "0011")
    with engine.connect() as connection:
        assert "rate_limit_starts" not in inspect(connection).get_table_names()
    engine.dispose()
