"""The SQL claim on SQLite and PostgreSQL (``repositories.sql_claim``, ``repositories.sql_limits``):
that it walks an index in claim order and reads the rows it takes (#28 item 3), and that a batch
smaller than the due backlog takes exactly the first ones by the one rule (``CLAIM_ORDER``),
plain and limited. The mutation run of the SQL claim runs this file (docs/mutation.md)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import delete, event, insert

from prorch.model.due import ClaimRequest
from prorch.model.limit_rules import ClaimLimit, RateLimit
from prorch.model.records import new_uuid
from prorch.storage.store import Store
from repositories import from_url
from repositories.schema import pipelines, rate_limit_starts
from tests.integration.conftest import make_backend

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
UNTIL = NOW + timedelta(minutes=5)
NAMES = ("A", "B", "C")
RUNNABLE = frozenset({(name, 1) for name in NAMES})


_stores: dict[str, Any] = {}


@pytest.fixture(params=["sqlite", "postgresql"])
def sql(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One store per dialect for the run, emptied before each test: the mutation run calls this
    file once per mutant, so a store is not migrated for every test. ``PRORCH_TEST_POSTGRES_URL``
    (a database on a server started once, docs/mutation.md) saves starting a server each run."""
    key = f"{request.param} {os.getpid()}"  # a forked process (a mutant's run) makes its own
    if key not in _stores:
        external = os.environ.get("PRORCH_TEST_POSTGRES_URL")
        if request.param == "postgresql" and external:
            _stores[key] = from_url(external)
        else:
            _stores[key] = make_backend(request.param, tmp_path_factory.mktemp(request.param), request)
    backend = _stores[key]
    backend.__dict__.pop("_by_model", None)  # new repositories: each test builds the statements
    with backend.engine.begin() as connection:
        connection.execute(delete(rate_limit_starts))
        connection.execute(delete(pipelines))
    return backend


def row(name: str = "A", priority: int = 0, minutes: float = -10, **changes: Any) -> dict[str, Any]:
    """A pipeline row due ``-minutes`` ago (due in ``minutes`` when positive); every column
    given, as an insert of many rows takes its columns from the first."""
    return {
        "uuid": new_uuid(), "name": name, "version": 1, "status": "pending", "params": {}, "context": {},
        "metadata": {}, "priority": priority, "created_at": NOW, "updated_at": NOW, "claims": 0,
        "next_run_at": NOW + timedelta(minutes=minutes), "revision": 0, "cancel_requested": False,
        "hook_shared": False, "crashes": 0, "lease_owner": None, "lease_expires_at": None, **changes,
    }  # fmt: skip


def fill(backend: Any, rows: list[dict[str, Any]]) -> None:
    with backend.engine.begin() as connection:
        connection.execute(insert(pipelines), rows)
    with backend.engine.connect() as connection:
        connection.exec_driver_sql("ANALYZE pipelines" if backend.engine.dialect.name == "postgresql" else "ANALYZE")
        connection.commit()


class Plans:
    """The plan of every claim statement the backend runs (EXPLAIN QUERY PLAN on SQLite, EXPLAIN
    on PostgreSQL), read with the statement's own values, before it runs."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.plans = backend, []
        event.listen(backend.engine, "before_cursor_execute", self.explain)

    def explain(self, connection: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if "FROM pipelines" not in statement or "ORDER BY" not in statement:
            return  # not a walk in claim order (a count, a lease by uuid, a rate's start)
        if self.backend.engine.dialect.name == "postgresql":
            cursor.execute("EXPLAIN " + statement, params)
            self.plans.append("\n".join(line for (line,) in cursor.fetchall()))
        else:
            found = cursor.connection.execute("EXPLAIN QUERY PLAN " + statement, params).fetchall()
            self.plans.append("\n".join(step[3] for step in found))

    def close(self) -> None:
        event.remove(self.backend.engine, "before_cursor_execute", self.explain)


CLAIMS = {
    "plain": {},
    "one name limited": {"A": ClaimLimit(max_running=1_000)},
    "limited": {name: ClaimLimit(max_running=1_000) for name in NAMES},
    "rate-limited": {name: ClaimLimit(rate=RateLimit(1_000, 60)) for name in NAMES},
    "per tenant": {name: ClaimLimit(per_tenant=1_000) for name in NAMES},
}


@pytest.mark.parametrize("runnable", [RUNNABLE, None], ids=["runnable", "any class"])
@pytest.mark.parametrize("limits", list(CLAIMS.values()), ids=list(CLAIMS))
def test_a_claim_walks_an_index_in_claim_order_and_sorts_nothing(
    sql: Any, limits: dict[str, ClaimLimit], runnable: Any
) -> None:
    """Regression (#28 item 3): the claim's ORDER BY priority DESC, next_run_at could not use the
    due index, so each claim read and sorted every due row (O(backlog) a pass; SQLite planned
    "USE TEMP B-TREE FOR ORDER BY", PostgreSQL a Sort). Now it walks ``ix_pipelines_claim`` (or
    ``ix_pipelines_claim_name`` for one name) and stops at the batch."""
    fill(sql, [row(NAMES[i % 3], priority=i % 3, minutes=-(i % 500) - 1) for i in range(1_500)])
    plans = Plans(sql)
    try:
        claimed = Store(sql).claim(ClaimRequest(NOW, "w", UNTIL, 50, limits, runnable))
    finally:
        plans.close()
    assert len(claimed) == 50
    assert plans.plans, "no claim statement seen"
    for plan in plans.plans:
        assert "ix_pipelines_claim" in plan, plan
        assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan
        assert "SCAN pipelines" not in plan and "Seq Scan on pipelines pipelines_1" not in plan, plan


ORDERED = [  # (name, priority, minutes overdue); the claim order by the rule is this list's order
    ("A", 9, 30), ("B", 9, 20), ("A", 9, 1), ("C", 0, 120), ("A", 0, 45), ("B", 0, 2), ("C", -3, 90), ("A", -3, 5),
]  # fmt: skip


def ordered(backend: Any) -> list[str]:
    """ORDERED stored in another order, with rows a claim must step over: a future one of the
    highest priority, a leased one, an ended one, one of a class no worker here runs."""
    rows = [row(name, priority, -minutes) for name, priority, minutes in ORDERED]
    others = [
        row("A", 9, 30),  # not yet due
        row("A", 9, -50, lease_owner="x", lease_expires_at=NOW + timedelta(minutes=1)),  # leased
        row("A", 9, -60, status="finished"),
        row("Z", 9, -70),  # not runnable
    ]
    fill(backend, others + rows[::-1])
    return [r["uuid"] for r in rows]


@pytest.mark.parametrize("limits", list(CLAIMS.values()), ids=list(CLAIMS))
def test_a_batch_takes_the_first_due_in_claim_order(sql: Any, limits: dict[str, ClaimLimit]) -> None:
    """Batches smaller than the backlog: a plain one takes the next ones by priority, then the
    longest due; a limited one (the unlimited names first, then each limited name) keeps that
    order within each name; both step over the future, leased, ended and not-runnable rows."""
    expected = ordered(sql)
    names = dict(zip(expected, [name for name, _, _ in ORDERED], strict=True))
    store = Store(sql)
    taken: list[str] = []
    for owner, size in (("w1", 3), ("w2", 2), ("w3", 10)):
        batch = store.claim(ClaimRequest(NOW, owner, UNTIL, size, limits, RUNNABLE))
        assert len(batch) == min(size, len(expected) - len(taken))
        assert all(p.lease_owner == owner and p.lease_expires_at == UNTIL and p.claims == 1 for p in batch)
        taken += [p.uuid for p in batch]
    if not limits:
        assert taken == expected
    for name in NAMES:
        assert [u for u in taken if names[u] == name] == [u for u in expected if names[u] == name]
    assert store.claim(ClaimRequest(NOW, "w4", UNTIL, 10, limits, RUNNABLE)) == []


def test_a_limited_name_keeps_its_limit_beside_the_unlimited_ones(sql: Any) -> None:
    """``max_running`` 2 on A, which has one live lease: the unlimited names fill the first
    batch, in claim order; the next takes one A, the oldest of the highest priority; then none."""
    expected = ordered(sql)
    names = dict(zip(expected, [name for name, _, _ in ORDERED], strict=True))
    store = Store(sql)
    limits = {"A": ClaimLimit(max_running=2)}
    first = store.claim(ClaimRequest(NOW, "w1", UNTIL, 4, limits, RUNNABLE))
    assert [p.uuid for p in first] == [u for u in expected if names[u] != "A"]
    second = store.claim(ClaimRequest(NOW, "w2", UNTIL, 100, limits, RUNNABLE))
    assert [p.uuid for p in second] == [expected[0]]
    assert store.claim(ClaimRequest(NOW, "w3", UNTIL, 100, limits, RUNNABLE)) == []
