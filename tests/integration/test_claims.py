"""The SQL claim on SQLite and PostgreSQL (``repositories.sql_claim``, ``repositories.sql_limits``):
that it walks an index in claim order and reads the rows it takes (#28 item 3), and that a batch
smaller than the due backlog takes exactly the first ones by the one rule (``CLAIM_ORDER``),
plain and limited. The mutation run of the SQL claim runs this file (docs/mutation.md)."""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import create_engine, delete, event, func, insert, select, text, update

from prorch.model.clock import SystemClock
from prorch.model.due import ClaimRequest
from prorch.model.limit_rules import ClaimLimit, Fairness, RateLimit
from prorch.model.records import Metadata, new_uuid
from prorch.storage.leases import LeaseKeeper
from prorch.storage.store import Store
from repositories import from_url, postgresql, postgresql_leases, sql_claim
from repositories import sqlite as sqlite_dialect
from repositories.schema import pipelines, rate_limit_starts
from repositories.sql_claim import SQLClaims
from tests.integration.conftest import make_backend
from tests.support.processes import wait_for

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
    backend._repositories.clear()
    with backend.engine.begin() as connection:
        connection.execute(delete(rate_limit_starts))
        connection.execute(delete(pipelines))
        if request.param == "postgresql":  # no name entered for its leases' table (0023) by an earlier test
            connection.exec_driver_sql("DELETE FROM pipeline_limited_names")
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

    def __init__(self, backend: Any, marker: str = "ORDER BY") -> None:
        self.backend, self.plans, self.marker = backend, [], marker
        event.listen(backend.engine, "before_cursor_execute", self.explain)
        # SQLite's plain claim runs on the driver's connection, past SQLAlchemy's events
        self.driven = sqlite_dialect._execute_rows

        def explained(on: Any, sql: str, parameters: list[Any]) -> list[Any]:
            driver = on.current_connection().connection.driver_connection
            self.explain(None, driver.cursor(), sql, parameters, None, False)
            return self.driven(on, sql, parameters)

        sqlite_dialect._execute_rows = explained

    def explain(self, connection: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if not ("FROM pipelines" in statement or "FROM pipeline_leases" in statement) or self.marker not in statement:
            return  # not a walk in claim order (a count, a lease by uuid, a rate's start)
        if self.backend.engine.dialect.name == "postgresql":
            cursor.execute("EXPLAIN " + statement, params)
            self.plans.append("\n".join(line for (line,) in cursor.fetchall()))
        else:
            found = cursor.connection.execute("EXPLAIN QUERY PLAN " + statement, params).fetchall()
            self.plans.append("\n".join(step[3] for step in found))

    def close(self) -> None:
        event.remove(self.backend.engine, "before_cursor_execute", self.explain)
        sqlite_dialect._execute_rows = self.driven


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


@pytest.mark.parametrize(
    "limits",
    [{}, {"A": ClaimLimit(max_running=1_000)}, {"Z": ClaimLimit(max_running=1)}],
    ids=["plain", "one name limited", "another name limited"],
)
def test_a_sqlite_claim_walks_the_claim_index_in_a_store_never_analyzed(
    tmp_path: Any, request: pytest.FixtureRequest, limits: dict[str, ClaimLimit]
) -> None:
    """Regression (#28, W1 at N=100,000 cost 1.4x N=1,000 a transition): prorch never runs
    ANALYZE, and without statistics SQLite planned the claim on ``ix_pipelines_due``
    (status=? AND next_run_at<?) and sorted every due row ("USE TEMP B-TREE FOR ORDER BY"): 8,000
    pages read and 200-350 ms a claim at 100,000 due. The plan test above runs ANALYZE first.
    Now a claim walks ``ix_pipelines_claim`` one priority at a time, due rows only (next_run_at<?,
    so a million waiting pipelines are not read either), and sorts nothing; a limited name's
    statements walk ``ix_pipelines_claim_name`` in claim order (they sorted every due row of
    every name too, once the one claim order read a limited name beside the unlimited ones)."""
    backend = make_backend("sqlite", tmp_path, request)
    rows = [row(NAMES[i % 3], priority=i % 3, minutes=-(i % 500) - 1) for i in range(1_500)]
    rows += [row(NAMES[i % 3], priority=i % 3, minutes=60 + i) for i in range(1_500)]  # waiting
    with backend.engine.begin() as connection:
        connection.execute(insert(pipelines), rows)  # and no ANALYZE: as prorch leaves a store
    plans = Plans(backend)
    try:
        claimed = Store(backend).claim(ClaimRequest(NOW, "w", UNTIL, 50, limits, RUNNABLE | {("Z", 1)}))
    finally:
        plans.close()
    assert [(p.priority, p.next_run_at) for p in claimed] == sorted(
        [(r["priority"], r["next_run_at"]) for r in rows if r["next_run_at"] <= NOW], key=lambda k: (-k[0], k[1])
    )[:50]
    assert plans.plans, "no claim statement seen"
    for plan in plans.plans:
        assert "TEMP B-TREE" not in plan, plan
        if "ix_pipelines_claim_name" in plan:  # a limited name's walk, in claim order from its first
            continue
        assert "ix_pipelines_claim" in plan and "next_run_at<?" in plan, plan
    with backend.engine.connect() as connection:  # the levels: probes of the index, no read of the rows
        found = connection.exec_driver_sql(
            "EXPLAIN QUERY PLAN " + sqlite_dialect.LEVELS.format(table="pipelines"), ("pending", "pending", 65)
        )
        levels = "\n".join(step[3] for step in found)
    assert "SCAN pipelines" not in levels and "COVERING INDEX ix_pipelines_claim" in levels, levels
    backend.dispose()


@pytest.mark.parametrize("levels", [3, 70], ids=["few priorities", "more than FEW_LEVELS"])
def test_a_claim_by_levels_takes_the_first_due_in_claim_order(sql: Any, levels: int) -> None:
    """SQLite claims one priority at a time (``SQLClaims.by_levels``), in one walk past
    ``FEW_LEVELS`` priorities; either way a batch is the first due ones by the one rule, past the
    levels whose pipelines are all waiting or leased."""
    leased = {"lease_owner": "x", "lease_expires_at": NOW + timedelta(minutes=1)}
    rows = [row("A", priority=i % levels, minutes=-(i % 7) - 1) for i in range(300)]
    rows += [row("B", priority=levels + 5, minutes=30), row("B", priority=levels + 4, minutes=-5, **leased)]
    fill(sql, rows)
    store = Store(sql)
    taken = claim(store, "w", 40) + claim(store, "w2", 40, {"B": ClaimLimit(max_running=5)})
    due = sorted((r for r in rows if r["name"] == "A"), key=lambda r: (-r["priority"], r["next_run_at"]))
    claimed = {r["uuid"]: r for r in rows if r["uuid"] in taken}
    assert len(taken) == 80
    assert sorted((-claimed[u]["priority"], claimed[u]["next_run_at"]) for u in taken) == [
        (-r["priority"], r["next_run_at"]) for r in due[:80]
    ]


def test_a_fair_claim_steps_over_the_keys_and_walks_each_key_in_claim_order(sql: Any) -> None:
    """A fair claim (#30 item 2) reads the name's keys by a skip over ``ix_pipelines_concurrency_key``
    and each key's first due ones in claim order on it: O(keys x batch), no sort, no scan of a
    backlog, and the few pipelines of a key behind a backlog of another are in the claim."""
    fill(sql, [row("A", minutes=-(i % 500) - 1, concurrency_key='"big"') for i in range(1_500)])
    fill(sql, [row("A", minutes=-1, concurrency_key='"small"') for _ in range(3)])
    plans = Plans(sql)
    try:
        fair = {"A": ClaimLimit(fair=Fairness())}
        claimed = Store(sql).claim(ClaimRequest(NOW, "w", UNTIL, 10, fair, frozenset({("A", 1)})))
    finally:
        plans.close()
    assert sorted(p.concurrency_key for p in claimed) == ['"big"'] * 7 + ['"small"'] * 3
    assert len(plans.plans) == 4, plans.plans  # the keys, the name's first, each key's first
    for plan in plans.plans:
        assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan
        assert "SCAN pipelines" not in plan and "Seq Scan on pipelines" not in plan, plan
    assert sum("ix_pipelines_concurrency_key" in plan for plan in plans.plans) == 3, plans.plans


def test_a_fair_name_s_groups_take_turns_beside_another_limited_name(sql: Any) -> None:
    """Claims of one take a fair name's groups in turn, also beside another limited name: each
    limited name's choice ordered its candidates for turns, and each advanced the process's
    rotation, so with two names a claim advanced it by two and the fair name began with the
    same group at every claim (a worker of one slot ran one tenant's whole backlog first; seen
    in test_key_limit_workers once every limited name was chosen in each claim)."""
    fill(sql, [row("F", minutes=-60 + i, concurrency_key='"big"') for i in range(3)])
    fill(sql, [row("F", minutes=-30 + i, concurrency_key='"small"') for i in range(3)])
    limits = {"A": ClaimLimit(per_key=1), "F": ClaimLimit(fair=Fairness())}  # no A due: it only counts
    store, runnable = Store(sql), frozenset({("A", 1), ("F", 1)})
    groups = [
        p.concurrency_key for n in range(4) for p in store.claim(ClaimRequest(NOW, f"w{n}", UNTIL, 1, limits, runnable))
    ]
    assert len(groups) == 4 and all(a != b for a, b in itertools.pairwise(groups)), groups


def test_a_fair_name_s_turns_hold_its_places_beside_an_unlimited_name(sql: Any) -> None:
    """Claims of one beside an unlimited name (B) due between the fair name's groups: the fair
    name's turns fill the places its first due pipelines hold in the one claim order
    (docs/concepts.md), as on memory and TinyDB. The SQL claim placed each chosen pipeline at its
    own due time: the small group's turn, due after B's, lost to B at every claim, so claims of
    one alternated the big group with B and the small group waited for all of B's backlog."""
    fill(sql, [row("F", minutes=-60 + i, concurrency_key='"big"') for i in range(3)])
    fill(sql, [row("F", minutes=-10, concurrency_key='"small"')])
    fill(sql, [row("B", minutes=-40 + i) for i in range(3)])
    limits, runnable = {"F": ClaimLimit(fair=Fairness())}, frozenset({("B", 1), ("F", 1)})
    store = Store(sql)
    taken = [p for n in range(6) for p in store.claim(ClaimRequest(NOW, f"w{n}", UNTIL, 1, limits, runnable))]
    assert [p.name for p in taken] == ["F"] * 4 + ["B"] * 2, [(p.name, p.concurrency_key) for p in taken]
    assert '"small"' in [p.concurrency_key for p in taken[:2]]  # its turn comes in the first two claims


def test_a_per_key_claim_reads_key_by_key_past_a_full_key_s_backlog(sql: Any) -> None:
    """``max_running_per_key`` with one key full and 1,500 due ahead of another key's three: the
    claim reads the few keys and each key's first due ones not the full key's backlog (the walk
    in claim order would read all 1,500 to find the three)."""
    leased = {"lease_owner": "x", "lease_expires_at": NOW + timedelta(minutes=1)}
    fill(sql, [row("A", minutes=-600, concurrency_key='"big"', **leased) for _ in range(2)])
    fill(sql, [row("A", minutes=-(i % 500) - 1, concurrency_key='"big"') for i in range(1_500)])
    fill(sql, [row("A", minutes=-1, concurrency_key='"small"') for _ in range(3)])
    plans = Plans(sql)
    try:
        per_key = {"A": ClaimLimit(per_key=2)}
        claimed = Store(sql).claim(ClaimRequest(NOW, "w", UNTIL, 10, per_key, frozenset({("A", 1)})))
    finally:
        plans.close()
    assert sorted(p.concurrency_key for p in claimed) == ['"small"'] * 2  # big is full, small has room for 2
    for plan in plans.plans:
        assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan
        assert "SCAN pipelines" not in plan and "Seq Scan on pipelines" not in plan, plan
    assert sum("ix_pipelines_concurrency_key" in plan for plan in plans.plans) == 2, plans.plans  # keys, small's


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
    """Batches smaller than the backlog take the next ones by priority, then the longest due,
    plain or limited (limits with room to spare: the one order across the names, not the
    unlimited names first); both step over the future, leased, ended and not-runnable rows."""
    expected = ordered(sql)
    names = dict(zip(expected, [name for name, _, _ in ORDERED], strict=True))
    store = Store(sql)
    taken: list[str] = []
    for owner, size in (("w1", 3), ("w2", 2), ("w3", 10)):
        batch = store.claim(ClaimRequest(NOW, owner, UNTIL, size, limits, RUNNABLE))
        assert len(batch) == min(size, len(expected) - len(taken))
        assert all(p.lease_owner == owner and p.lease_expires_at == UNTIL and p.claims == 1 for p in batch)
        taken += [p.uuid for p in batch]
    assert taken == expected
    for name in NAMES:
        assert [u for u in taken if names[u] == name] == [u for u in expected if names[u] == name]
    assert store.claim(ClaimRequest(NOW, "w4", UNTIL, 10, limits, RUNNABLE)) == []


def test_a_limited_name_keeps_its_limit_beside_the_unlimited_ones(sql: Any) -> None:
    """``max_running`` 2 on A, which has one live lease: a batch of 4 takes, in claim order, the
    oldest A of the highest priority (A's room of one) and the first three of the unlimited
    names, stepping over the other As; the next takes the last unlimited one; then none. (The
    claim took every unlimited name first: the first batch had no A, though A came first.)"""
    expected = ordered(sql)
    names = dict(zip(expected, [name for name, _, _ in ORDERED], strict=True))
    store = Store(sql)
    limits = {"A": ClaimLimit(max_running=2)}
    first = store.claim(ClaimRequest(NOW, "w1", UNTIL, 4, limits, RUNNABLE))
    unlimited = [u for u in expected if names[u] != "A"]
    assert [p.uuid for p in first] == [expected[0], *unlimited[:3]]
    second = store.claim(ClaimRequest(NOW, "w2", UNTIL, 100, limits, RUNNABLE))
    assert [p.uuid for p in second] == unlimited[3:]
    assert store.claim(ClaimRequest(NOW, "w3", UNTIL, 100, limits, RUNNABLE)) == []


def claim(store: Store, owner: str, size: int, limits: dict[str, ClaimLimit] | None = None, **kw: Any) -> list[str]:
    """The uuids a claim at NOW takes, in the order it returns them."""
    at = kw.pop("at", NOW)
    request = ClaimRequest(at, owner, at + timedelta(minutes=5), size, limits or {}, kw.pop("runnable", RUNNABLE))
    return [p.uuid for p in store.claim(request)]


@pytest.mark.parametrize("limits", [{}, {"A": ClaimLimit(max_running=10)}], ids=["plain", "limited"])
def test_the_due_rule_at_its_edges(sql: Any, limits: dict[str, ClaimLimit]) -> None:
    """Due exactly now, a lease expiring exactly now, a class version not run here, no class."""
    rows = {
        "now": row("A", minutes=0),
        "lease ends now": row("A", minutes=-5, lease_owner="x", lease_expires_at=NOW),
        "a second later": row("A", minutes=1 / 60),
        "lease ends later": row("A", minutes=-5, lease_owner="x", lease_expires_at=NOW + timedelta(seconds=1)),
        "version 2": row("A", minutes=-5, version=2),
        "cancelled": row("A", minutes=-5, status="cancelled"),
    }
    fill(sql, list(rows.values()))
    store = Store(sql)
    assert claim(store, "w", 10, limits, runnable=frozenset()) == []
    taken = set(claim(store, "w", 10, limits))
    assert taken == {rows["now"]["uuid"], rows["lease ends now"]["uuid"]}
    assert claim(store, "w2", 10, limits, runnable=frozenset({("A", 2)})) == [rows["version 2"]["uuid"]]


@pytest.mark.parametrize("limited", [False, True])
def test_claims_of_other_classes_on_one_store_build_their_own_statement(sql: Any, limited: bool) -> None:
    fill(sql, [row("A", minutes=-3), row("B", minutes=-2), row("C", minutes=-1)])
    store = Store(sql)
    limits = {"C": ClaimLimit(max_running=5)} if limited else {}
    names = {}
    for name in ("B", "A", "C"):
        (uuid,) = claim(store, name, 10, limits, runnable=frozenset({(name, 1)}))
        names[name] = store.get_pipeline(uuid).name
    assert names == {"A": "A", "B": "B", "C": "C"}


def test_search_due_reads_in_claim_order_up_to_the_limit(sql: Any) -> None:
    """Every class (the "Z" one first: priority 9, the longest due), in claim order, unleased."""
    expected = ordered(sql)
    found = sql("PIPELINE").search_due(NOW, 4)
    assert found[0]["name"] == "Z" and [r["uuid"] for r in found[1:]] == expected[:3]
    assert [r["uuid"] for r in sql("PIPELINE").search_due(NOW, 100)][1:] == expected
    assert all(r["lease_owner"] is None for r in found)


@pytest.mark.parametrize("levels", [3, 70], ids=["few priorities", "more than FEW_LEVELS"])
def test_a_sqlite_search_due_walks_by_levels_in_a_store_never_analyzed(
    tmp_path: Any, request: pytest.FixtureRequest, levels: int
) -> None:
    """Regression: ``search_due`` (the idle worker's look at another process's writes, a store's
    listing of due work) walked every level in one statement, which SQLite without statistics
    planned on ``ix_pipelines_due`` and sorted every due row each call ("USE TEMP B-TREE").
    Now it reads one priority at a time, as the claim does; the same rows in claim order."""
    backend = make_backend("sqlite", tmp_path, request)
    leased = {"lease_owner": "x", "lease_expires_at": NOW + timedelta(minutes=1)}
    rows = [row(NAMES[i % 3], priority=i % levels, minutes=-(i % 500) - 1) for i in range(1_500)]
    rows += [row("A", priority=levels + 5, minutes=60 + i) for i in range(300)]  # waiting, a higher level
    rows += [row("B", priority=levels + 4, minutes=-5, **leased)]
    with backend.engine.begin() as connection:
        connection.execute(insert(pipelines), rows)  # and no ANALYZE: as prorch leaves a store
    due = sorted((r for r in rows if r["next_run_at"] <= NOW and r["lease_owner"] is None), key=row_order)
    plans = Plans(backend)
    try:
        found = [backend("PIPELINE").search_due(NOW, size) for size in (1, 50, 2_000)]
    finally:
        plans.close()
    for size, rows_found in zip((1, 50, 2_000), found, strict=True):
        assert [r["uuid"] for r in rows_found] == [r["uuid"] for r in due[:size]]
    assert plans.plans, "no search statement seen"
    if levels <= sql_claim.FEW_LEVELS:
        for plan in plans.plans:
            assert "TEMP B-TREE" not in plan, plan
            assert "ix_pipelines_claim" in plan and "next_run_at<?" in plan, plan
    backend.dispose()


def row_order(r: dict[str, Any]) -> tuple[int, datetime, str]:
    return (-r["priority"], r["next_run_at"], r["uuid"])


def test_claim_one_and_renew_lease(sql: Any) -> None:
    """``claim_one`` whatever the next run: not another owner's live lease, again our own, an
    expired one; an ended pipeline as it is, unleased; a missing one None. ``renew_lease`` only
    for its owner, and it moves nothing else."""
    later = row("A", minutes=30)
    theirs = row("A", lease_owner="x", lease_expires_at=NOW + timedelta(seconds=1))
    expired = row("A", lease_owner="x", lease_expires_at=NOW)
    done = row("A", status="finished")
    fill(sql, [later, theirs, expired, done])
    store, until = Store(sql), NOW + timedelta(minutes=1)
    got = store.claim_one(later["uuid"], NOW, "me", until)
    assert got is not None and (got.lease_owner, got.lease_expires_at, got.claims, got.revision) == ("me", until, 1, 1)
    again = store.claim_one(later["uuid"], NOW, "me", until + timedelta(seconds=1))
    assert again is not None and again.claims == 2
    assert store.claim_one(theirs["uuid"], NOW, "me", until) is None
    assert store.get_pipeline(theirs["uuid"]).lease_owner == "x"
    taken = store.claim_one(expired["uuid"], NOW, "me", until)
    assert taken is not None and taken.lease_owner == "me"
    ended = store.claim_one(done["uuid"], NOW, "me", until)
    assert ended is not None and ended.lease_owner is None and ended.revision == 0
    assert store.claim_one("missing", NOW, "me", until) is None
    assert store.renew_lease(later["uuid"], "me", until + timedelta(minutes=9))
    renewed = store.get_pipeline(later["uuid"])
    assert (renewed.lease_expires_at, renewed.revision) == (until + timedelta(minutes=9), 2)
    assert not store.renew_lease(later["uuid"], "other", until)
    assert not store.renew_lease("missing", "me", until)
    assert store.get_pipeline(later["uuid"]).lease_expires_at == until + timedelta(minutes=9)


def test_max_running_counts_live_leases_only(sql: Any) -> None:
    """A lease expiring exactly now is not running (and that pipeline is due again); a finished
    pipeline's stale lease is not running; another name's leases are not this one's."""
    fill(sql, [
        row("A", minutes=-9, lease_owner="x", lease_expires_at=NOW + timedelta(seconds=1)),  # running
        row("A", minutes=-8, lease_owner="x", lease_expires_at=NOW),  # ended now: due
        row("A", minutes=-7, status="finished", lease_owner="x", lease_expires_at=NOW + timedelta(minutes=1)),
        row("B", minutes=-6, lease_owner="x", lease_expires_at=NOW + timedelta(minutes=1)),
        *[row("A", minutes=-5 + i) for i in range(4)],
    ])  # fmt: skip
    store = Store(sql)
    limits = {"A": ClaimLimit(max_running=3)}
    assert len(claim(store, "w1", 10, limits)) == 2
    assert claim(store, "w2", 10, limits) == []


def test_live_leases_are_counted_from_the_index_of_leased_rows(sql: Any) -> None:
    """``max_running`` counts a name's live leases from ``ix_pipelines_leased`` (#28 item 4: now
    keyed on the lease's owner, which its renewals leave alone, so that they can be HOT updates
    on PostgreSQL): it reads the leased rows, not every pending one of the name."""
    leased = [row("A", minutes=-9, lease_owner="x", lease_expires_at=NOW + timedelta(minutes=1)) for _ in range(3)]
    fill(sql, [*leased, *[row("A", minutes=-(i % 500) - 1) for i in range(1_500)]])
    plans = Plans(sql, marker="count(")
    try:
        claimed = claim(Store(sql), "w", 10, {"A": ClaimLimit(max_running=5)})
    finally:
        plans.close()
    assert len(claimed) == 2
    assert plans.plans, "no count seen"
    # PostgreSQL: from the narrow table of leases by name (0023), each joined to its pipeline
    index = "ix_pipeline_leases_name" if sql.engine.dialect.name == "postgresql" else "ix_pipelines_leased"
    for plan in plans.plans:
        assert index in plan, plan


def lease_rows(backend: Any) -> set[str] | None:
    """PostgreSQL: the uuids in ``pipeline_leases`` (SQLite has no such table: None)."""
    if backend.engine.dialect.name != "postgresql":
        return None
    with backend.engine.connect() as connection:
        return {uuid for (uuid,) in connection.exec_driver_sql("SELECT pipeline_uuid FROM pipeline_leases")}


def test_max_running_counts_every_writer_s_leases(sql: Any) -> None:
    """Regression (#28 item 4): on PostgreSQL a limited name's live leases are counted from
    ``pipeline_leases`` (0023), which its first limited claim fills with the leases stored until
    then and triggers keep afterwards, so every writer's lease counts: an older prorch's (a raw
    UPDATE of ``lease_owner`` on the row), ``claim_one``'s, the limited claim's; a release or an
    expiry frees the room, a deleted leased pipeline leaves no row behind, and an unlimited
    name's leases never go there."""
    rows = [row("A", minutes=-9 + i) for i in range(8)]
    free = row("B", minutes=-9)
    fill(sql, [*rows, free])
    store, limits = Store(sql), {"A": ClaimLimit(max_running=3)}
    old = [rows[0]["uuid"], rows[1]["uuid"]]

    def write(**values: Any) -> None:  # as an older prorch writes the row: no code of its own for the table
        with sql.engine.begin() as connection:
            connection.execute(update(pipelines).where(pipelines.c.uuid.in_(old)).values(**values))

    write(lease_owner="older", lease_expires_at=NOW + timedelta(minutes=1), revision=pipelines.c.revision + 1)
    assert lease_rows(sql) in (None, set())  # A has had no limited claim yet
    assert claim(store, "w1", 10, limits) == [free["uuid"], rows[2]["uuid"]]  # 2 of the older worker's + 1
    assert lease_rows(sql) in (None, {*old, rows[2]["uuid"]})  # copied, then kept by the trigger; not B's
    assert store.claim_one(rows[7]["uuid"], NOW, "w2", UNTIL) is not None  # one run in process: 4 live
    assert lease_rows(sql) in (None, {*old, rows[2]["uuid"], rows[7]["uuid"]})
    write(lease_owner=None, lease_expires_at=None)  # the older worker releases both: 2 live
    assert lease_rows(sql) in (None, {rows[2]["uuid"], rows[7]["uuid"]})
    assert claim(store, "w3", 10, limits) == [rows[0]["uuid"]]
    assert claim(store, "w3", 10, limits) == []
    with sql.engine.begin() as connection:  # one lease runs out, its owner still written on the row
        connection.execute(update(pipelines).where(pipelines.c.uuid == rows[7]["uuid"]).values(lease_expires_at=NOW))
    assert claim(store, "w4", 10, limits) == [rows[1]["uuid"]]
    with sql.engine.begin() as connection:  # retention or a purge deleting leased pipelines
        connection.execute(delete(pipelines).where(pipelines.c.uuid.in_([r["uuid"] for r in rows[:5]])))
    assert lease_rows(sql) in (None, {rows[7]["uuid"]})  # the expired one's owner is still on its row


def test_a_rate_limit_counts_the_starts_within_its_period(sql: Any) -> None:
    """2 a minute: two now, none more in the minute, two more once a minute has passed exactly
    (a start exactly one period old no longer counts); one start stored per claim, the ones a
    period old pruned."""
    fill(sql, [row("A", minutes=-9 + i) for i in range(6)])
    store = Store(sql)
    limits = {"A": ClaimLimit(rate=RateLimit(2, 60))}
    assert len(claim(store, "w1", 10, limits)) == 2
    assert claim(store, "w2", 10, limits, at=NOW + timedelta(seconds=59)) == []
    assert len(claim(store, "w3", 1, limits, at=NOW + timedelta(seconds=60))) == 1
    assert len(claim(store, "w4", 10, limits, at=NOW + timedelta(seconds=61))) == 1
    with sql.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(rate_limit_starts)).scalar_one() == 2


def test_max_running_and_a_rate_together_take_the_smaller_room(sql: Any) -> None:
    fill(sql, [row("A", minutes=-9 + i) for i in range(6)])
    store = Store(sql)
    assert len(claim(store, "w1", 10, {"A": ClaimLimit(max_running=3, rate=RateLimit(5, 60))})) == 3
    assert len(claim(store, "w2", 10, {"A": ClaimLimit(max_running=9, rate=RateLimit(4, 60))})) == 1


TENANTS = [  # (context, minutes overdue): t1 first in claim order, with many due
    *[({"tenant": "t1"}, 50 - i) for i in range(5)],
    ({"tenant": 7}, 20), ({"tenant": "t2"}, 15), ({}, 12), ({"tenant": {"x": 1}}, 11), ({"tenant": None}, 10),
    ({"tenant": "t2"}, 5),
]  # fmt: skip


def test_per_tenant_takes_one_of_each_tenant_behind_a_busy_one(sql: Any) -> None:
    """``max_running_per_tenant`` 1: t1's many due pipelines do not hide the others; a number is
    a tenant; no tenant, a non-scalar one and null are one group (the pipelines without one);
    a tenant's live lease counts, another name's does not, one ending exactly now does not."""
    rows = [row("A", minutes=-overdue, context=context) for context, overdue in TENANTS]
    busy = row("A", minutes=-60, context={"tenant": "t2"}, lease_owner="x", lease_expires_at=NOW + timedelta(minutes=1))
    other = row("B", minutes=-60, context={"tenant": 7}, lease_owner="x", lease_expires_at=NOW + timedelta(minutes=1))
    ended = row("A", minutes=-3, context={"tenant": "t3"}, lease_owner="old", lease_expires_at=NOW)  # due again
    fill(sql, [*rows, busy, other, ended])
    store = Store(sql)
    limits = {"A": ClaimLimit(per_tenant=1)}
    taken = claim(store, "w1", 10, limits)
    by_uuid = {r["uuid"]: i for i, r in enumerate([*rows, ended])}
    assert sorted(by_uuid[u] for u in taken) == [0, 5, 7, len(rows)]  # t1's, 7's, the untenanted group's, t3's
    assert claim(store, "w2", 10, limits) == []
    assert len(claim(store, "w3", 2, {"A": ClaimLimit(per_tenant=2)})) == 2  # t1's and 7's second: room 2


def test_per_tenant_with_the_untenanted_group_full_takes_the_tenants_behind_it(sql: Any) -> None:
    """The pipelines without a tenant are one group: with one of them running, the window leaves
    the group out, so the many due ones ahead do not hide a tenant's."""
    running = row("A", minutes=-60, lease_owner="x", lease_expires_at=NOW + timedelta(minutes=1))
    untenanted = [row("A", minutes=-50 + i, context=context) for i, context in enumerate([{}, {"tenant": None}] * 3)]
    tenant = row("A", minutes=-1, context={"tenant": "t9"})
    fill(sql, [running, *untenanted, tenant])
    assert claim(Store(sql), "w", 2, {"A": ClaimLimit(per_tenant=1)}) == [tenant["uuid"]]


def test_leases_renewed_together_go_by_chunks_in_one_transaction(sql: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """More leases than one statement takes (``RENEW_CHUNK``): one statement per chunk, all in
    one transaction; only the owner's leases are renewed, in every chunk."""
    monkeypatch.setattr(sql_claim, "RENEW_CHUNK", 2)
    rows = [row("A", lease_owner="me#1" if i != 3 else "x#1", lease_expires_at=UNTIL) for i in range(5)]
    fill(sql, rows)
    statements: list[str] = []
    commits: list[int] = []

    def seen(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    def committed(connection: Any) -> None:
        commits.append(1)

    event.listen(sql.engine, "before_cursor_execute", seen)
    event.listen(sql.engine, "commit", committed)
    try:
        renewed, failed = Store(sql).renew_leases([(r["uuid"], "me#1") for r in rows], UNTIL + timedelta(minutes=5))
    finally:
        event.remove(sql.engine, "before_cursor_execute", seen)
        event.remove(sql.engine, "commit", committed)
    assert renewed == {r["uuid"] for i, r in enumerate(rows) if i != 3} and failed == {}
    batches = [s for s in statements if "RETURNING" in s]
    assert len(batches) == 3
    assert len(commits) == 1  # the refused lease is not tried again alone


def test_leases_renewed_together_are_found_by_their_uuid_not_by_a_scan(sql: Any) -> None:
    """SQLite: ``(uuid, lease_owner) IN (VALUES ...)`` alone used no index, so each chunk of a
    keeper's turn scanned the whole pipelines table while holding the database's write lock
    (30 ms a chunk with 200,000 pipelines, growing with the table, for every worker every third
    of a lease). The uuids' own ``IN`` finds the rows by the primary key."""
    if sql.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL's planner finds the rows by the primary key (a BitmapOr) once the table is large")
    rows = [row("A", lease_owner="me#1", lease_expires_at=UNTIL) for _ in range(50)]
    fill(sql, rows)
    plans: list[str] = []

    def explain(connection: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if statement.startswith("UPDATE pipelines") and "RETURNING" in statement:
            found = cursor.connection.execute("EXPLAIN QUERY PLAN " + statement, params).fetchall()
            plans.append("; ".join(step[3] for step in found))

    event.listen(sql.engine, "before_cursor_execute", explain)
    try:
        renewed, _ = Store(sql).renew_leases([(r["uuid"], "me#1") for r in rows[:10]], UNTIL + timedelta(minutes=5))
    finally:
        event.remove(sql.engine, "before_cursor_execute", explain)
    assert renewed == {r["uuid"] for r in rows[:10]}
    assert len(plans) == 1 and "SEARCH pipelines USING INDEX" in plans[0] and "SCAN pipelines" not in plans[0], plans


def test_leases_renewed_together_wait_for_no_row_while_holding_the_others(sql: Any) -> None:
    """PostgreSQL: ``renew_leases`` skips a row that another transaction holds (a group commit
    of transitions, which writes several pipelines one after another), commits the others,
    then renews that one alone once it is free. A batch that waited for the row while holding
    the others could deadlock with that transaction as it went on to write one of them."""
    if sql.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no row locks: its write lock orders the writers")
    rows = [row("A", minutes=-10 + i, lease_owner="me#1", lease_expires_at=UNTIL) for i in range(10)]
    fill(sql, rows)
    store, later, c = Store(sql), UNTIL + timedelta(minutes=5), pipelines.c
    busy, others = rows[-1]["uuid"], [r["uuid"] for r in rows[:-1]]
    results: list[Any] = []
    renewing = threading.Thread(
        target=lambda: results.append(store.renew_leases([(r["uuid"], "me#1") for r in rows], later))
    )
    group_commit = create_engine(sql.engine.url)
    try:
        with group_commit.begin() as transaction:
            transaction.execute(update(pipelines).where(c.uuid == busy).values(revision=c.revision + 1))
            renewing.start()
            wait_for(lambda: {store.get_pipeline(u).lease_expires_at for u in others} == {later}, 10, "the free rows")  # type: ignore[union-attr]
            transaction.execute(update(pipelines).where(c.uuid.in_(others)).values(revision=c.revision + 1))
        renewing.join(10)
    finally:
        group_commit.dispose()
    assert results == [({r["uuid"] for r in rows}, {})]
    assert store.get_pipeline(busy).lease_expires_at == later  # type: ignore[union-attr]


def test_a_lease_whose_row_an_idle_transaction_holds_waits_a_share_of_the_lease_and_is_not_lost(sql: Any) -> None:
    """PostgreSQL: a session left idle in its transaction holds one lease's row. The keeper's
    turn renewed that lease alone after the batch, waiting for the row with no limit: the
    keeper thread, and so every other lease of the worker, hung until that session ended. Now
    it waits a sixth of the lease at most: the turn returns, the other leases are renewed, and
    that one is neither renewed nor lost (tried again at the next turn)."""
    if sql.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no row locks: its write lock orders the writers")
    lease = 3.0
    clock = SystemClock()
    now = clock.now()
    rows = [row("A", lease_owner="me#1", lease_expires_at=now + timedelta(seconds=lease)) for _ in range(5)]
    fill(sql, rows)
    store, c = Store(sql), pipelines.c
    busy, others = rows[0]["uuid"], [r["uuid"] for r in rows[1:]]
    keeper = LeaseKeeper(store, lease, clock)
    keeper.hold([store.get_pipeline(r["uuid"]) for r in rows], time.monotonic())  # type: ignore[misc]
    turn = threading.Thread(target=keeper.renew_all, daemon=True)
    idle = create_engine(sql.engine.url)
    try:
        with idle.connect() as session:
            session.execute(update(pipelines).where(c.uuid == busy).values(revision=c.revision + 1))  # left open
            started = time.monotonic()
            turn.start()
            turn.join(10 * lease)
            took = time.monotonic() - started
            returned = not turn.is_alive()
            session.rollback()
        turn.join(10)
    finally:
        idle.dispose()
    assert returned, "the keeper's turn waited for the idle transaction"
    assert took < lease, took  # a sixth of the lease, and the batch: far below its end
    assert all(expires(store, uuid) > now + timedelta(seconds=lease) for uuid in others)
    assert expires(store, busy) == now + timedelta(seconds=lease)
    assert keeper._lost == set() and set(keeper._held) == {r["uuid"] for r in rows}


def expires(store: Store, uuid: str) -> datetime:
    record = store.get_pipeline(uuid)
    assert record is not None and record.lease_expires_at is not None
    return record.lease_expires_at


def test_a_pipeline_leased_between_the_window_and_the_lease_is_left_alone(sql: Any) -> None:
    """A per-tenant claim reads its candidates, then leases them only if still due: a
    ``claim_one`` of another process in between keeps its lease (PostgreSQL: the name's lock
    does not stop it; SQLite's write lock does, so nothing can come between)."""
    if sql.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's write lock keeps other writers out of the claim")
    rows = [row("A", minutes=-9 + i, context={"tenant": f"t{i}"}) for i in range(3)]
    fill(sql, rows)
    thief = create_engine(sql.engine.url)
    stolen: list[str] = []

    def steal(connection: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if statement.startswith("SELECT") and "ORDER BY" in statement and "context" in statement and not stolen:
            stolen.append(rows[0]["uuid"])
            with thief.begin() as other:
                other.execute(
                    update(pipelines).where(pipelines.c.uuid == rows[0]["uuid"])
                    .values(lease_owner="thief", lease_expires_at=NOW + timedelta(minutes=1))
                )  # fmt: skip

    event.listen(sql.engine, "after_cursor_execute", steal)
    try:
        taken = claim(Store(sql), "w", 10, {"A": ClaimLimit(per_tenant=1)})
    finally:
        event.remove(sql.engine, "after_cursor_execute", steal)
        thief.dispose()
    assert stolen and sorted(taken) == sorted(r["uuid"] for r in rows[1:])
    assert Store(sql).get_pipeline(rows[0]["uuid"]).lease_owner == "thief"


def holds_the_lock_of(backend: Any, name: str) -> bool:
    """Whether another connection finds the claim's lock of ``name`` taken: PostgreSQL's
    advisory lock of the name, SQLite's write lock."""
    if backend.engine.dialect.name == "postgresql":
        other = create_engine(backend.engine.url)
        try:
            with other.begin() as connection:
                key = {"key": f"prorch:limit:{name}"}
                return not connection.execute(text("SELECT pg_try_advisory_xact_lock(hashtext(:key))"), key).scalar()
        finally:
            other.dispose()
    probe = sqlite3.connect(backend.engine.url.database, timeout=0)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.rollback()
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        probe.close()


def test_a_limited_name_is_counted_and_claimed_under_its_lock(sql: Any) -> None:
    """Regression guard: ``max_running`` holds across workers only if the count and the claim
    are one transaction holding the name's lock; checked from another connection while the
    claim counts (and the lock is free again once it is done)."""
    fill(sql, [row("A", minutes=-5 + i) for i in range(3)])
    seen: list[bool] = []

    def probe(connection: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if statement.startswith("SELECT count(*)") and not seen:
            seen.append(holds_the_lock_of(sql, "A"))

    event.listen(sql.engine, "after_cursor_execute", probe)
    try:
        taken = claim(Store(sql), "w", 10, {"A": ClaimLimit(max_running=2)})
    finally:
        event.remove(sql.engine, "after_cursor_execute", probe)
    assert len(taken) == 2 and seen == [True]
    assert not holds_the_lock_of(sql, "A")


def test_a_rate_limit_prunes_only_its_own_names_starts(sql: Any) -> None:
    """B may start 1 an hour, A 1 a minute: A's claim, pruning its starts a minute old, leaves
    B's start of two minutes ago, so B is still full."""
    fill(sql, [*[row("A", minutes=-9 + i) for i in range(3)], *[row("B", minutes=-9 + i) for i in range(3)]])
    store = Store(sql)
    limits = {"A": ClaimLimit(rate=RateLimit(1, 60)), "B": ClaimLimit(rate=RateLimit(1, 3600))}
    assert len(claim(store, "w1", 10, limits)) == 2  # one of each
    later = NOW + timedelta(minutes=2)
    assert len(claim(store, "w2", 10, {"A": limits["A"]}, at=later, runnable=frozenset({("A", 1)}))) == 1
    assert claim(store, "w3", 10, {"B": limits["B"]}, at=later, runnable=frozenset({("B", 1)})) == []


@pytest.mark.parametrize("mark", [False, True], ids=["plain", "marking"])
@pytest.mark.parametrize("runnable", [RUNNABLE, None], ids=["runnable", "any class"])
def test_sqlite_s_claim_on_the_driver_takes_and_reads_what_sqlalchemy_s_path_does(
    tmp_path: Any, mark: bool, runnable: Any
) -> None:
    """#28 item 5: SQLite's plain claim runs SQLAlchemy's statement, compiled once, on the
    driver's connection, and reads its rows as ``get`` does. Two stores with the same rows
    (every column set, JSON, times, flags; due, future, leased, a crash suspect): the same
    claim on each, one per path, leases the same rows and returns the same records."""
    rows = [
        row("A", priority=2, minutes=-3, params={"n": 1, "big": 2**70, "deep": [{"x": None}]}, context={"tenant": "t"},
            metadata={"current_step": "s"}, attributes={"k": "v"}, trace={"traceparent": "00-1-2-01"}, key="k1",
            last_error={"type": "E", "message": "m", "traceback": None, "hook": "on_start"}, crashes=1,
            hook_started_at=NOW - timedelta(seconds=3), hook_shared=True, cancel_requested=True),
        row("B", minutes=-2, concurrency_key='"x"', parent_uuid=new_uuid()),
        row("C", minutes=-1, lease_owner="other", lease_expires_at=NOW - timedelta(seconds=1)),
        row("A", minutes=-1, lease_owner="other", lease_expires_at=NOW + timedelta(seconds=1)),
        row("B", minutes=1),
        row("D", minutes=-5),
        row("C", minutes=0),  # due exactly now: the bound time's text must be the stored times' format
    ]  # fmt: skip
    columns = {key for r in rows for key in r}
    claimed = []
    for name, path in (("driver", sqlite_dialect.SQLiteRepository.claim), ("sqlalchemy", SQLClaims.claim)):
        backend = from_url(f"sqlite:///{tmp_path / name}.db")
        fill(backend, [{**dict.fromkeys(columns), **r} for r in rows])  # one insert: every row every column
        repository = backend(Metadata.PIPELINES_MODEL)
        taken = path(repository, ClaimRequest(NOW, "w", UNTIL, 10, {}, runnable, mark))
        with sqlite3.connect(tmp_path / f"{name}.db") as raw:  # the text stored, as both paths write it
            stored = raw.execute("SELECT * FROM pipelines ORDER BY uuid").fetchall()
        claimed.append((taken, stored))
        backend.dispose()
    (driver, driver_stored), (sqlalchemy, sqlalchemy_stored) = claimed
    assert [r["name"] for r in driver] == (["A", "B", "C", "C"] if runnable else ["A", "D", "B", "C", "C"])
    assert driver == sqlalchemy
    assert driver_stored == sqlalchemy_stored


def test_a_lease_written_while_its_name_is_entered_is_counted(sql: Any) -> None:
    """PostgreSQL (0023): a lease written before a name's first limited claim entered it, by a
    transaction still open then (an older prorch's), is not in ``pipeline_leases`` by its
    trigger; the entry's copy waits for that transaction and copies it, so it is counted."""
    if sql.engine.dialect.name != "postgresql":
        pytest.skip("SQLite counts the leases on the pipelines table")
    rows = [row("A", minutes=-9 + i) for i in range(4)]
    fill(sql, rows)
    writer = sql.engine.connect()
    writer.execute(
        update(pipelines)
        .where(pipelines.c.uuid == rows[0]["uuid"])
        .values(lease_owner="older", lease_expires_at=NOW + timedelta(minutes=1))
    )  # in flight: A is not entered yet, so its trigger wrote nothing
    found: list[list[str]] = []
    limits = {"A": ClaimLimit(max_running=2)}
    claimer = threading.Thread(target=lambda: found.append(claim(Store(sql), "w", 10, limits)))
    claimer.start()
    claimer.join(0.5)
    assert claimer.is_alive()  # the copy waits for the row the writer holds
    writer.commit()
    writer.close()
    claimer.join(10)
    assert found == [[rows[1]["uuid"]]]  # the older worker's lease and one more
    assert lease_rows(sql) == {rows[0]["uuid"], rows[1]["uuid"]}


def test_the_entry_of_a_name_holds_no_writer_back(sql: Any) -> None:
    """#28: a name's first limited claim copies its stored leases once the writers in flight at
    its entry have ended. It took ``LOCK TABLE pipelines IN SHARE MODE`` for that, which queued
    every later writer of pipelines behind it until they had (up to its 2 s lock timeout, once
    per name): here a writer of another pipeline, allowed to wait 1 s, gave up. Now the entry
    waits for those writers by their locks, and takes none: the other writer goes through at
    once while the claim still waits, and the lease in flight is counted."""
    if sql.engine.dialect.name != "postgresql":
        pytest.skip("SQLite counts the leases on the pipelines table")
    rows = [row("A", minutes=-9 + i) for i in range(4)]
    other = row("Z", minutes=-9)  # of a class the claim does not run: not among the rows it locks
    fill(sql, [*rows, other])
    in_flight = sql.engine.connect()
    in_flight.execute(
        update(pipelines).where(pipelines.c.uuid == rows[0]["uuid"]).values(lease_owner="older", lease_expires_at=UNTIL)
    )  # A not entered yet: its trigger wrote nothing
    found: list[list[str]] = []
    claimer = threading.Thread(
        target=lambda: found.append(claim(Store(sql), "w", 10, {"A": ClaimLimit(max_running=2)}))
    )
    claimer.start()
    try:
        waiting = time.monotonic() + 10
        while not postgresql_listed(sql) and time.monotonic() < waiting:
            time.sleep(0.01)  # entered: the copy now waits for the writer in flight
        with sql.engine.connect() as writer:
            writer.execute(text("SET LOCAL lock_timeout = '1s'"))
            writer.execute(update(pipelines).where(pipelines.c.uuid == other["uuid"]).values(priority=3))
            writer.commit()
        assert claimer.is_alive()  # the copy still waits for the writer in flight
    finally:
        in_flight.commit()
        in_flight.close()
        claimer.join(10)
    assert found == [[rows[1]["uuid"]]]  # the lease in flight counted, and one more
    assert lease_rows(sql) == {rows[0]["uuid"], rows[1]["uuid"]}


def postgresql_listed(backend: Any) -> set[str]:
    with backend.engine.connect() as connection:
        return set(connection.exec_driver_sql("SELECT name FROM pipeline_limited_names").scalars())


def test_a_name_not_entered_in_time_is_counted_from_the_pipelines(sql: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL (0023): while a writer keeps the pipelines table past ``ENTRY_WAIT``, the
    name's first limited claim cannot copy its leases and counts them from the pipelines, which
    is as right; a later claim (past the pause between tries, none here) enters it."""
    if sql.engine.dialect.name != "postgresql":
        pytest.skip("SQLite counts the leases on the pipelines table")
    monkeypatch.setattr(postgresql_leases, "ENTRY_WAIT", 0.1)
    monkeypatch.setattr(postgresql, "ENTRY_RETRY_FIRST", 0.0)
    rows = [row("A", minutes=-9 + i, lease_owner="x", lease_expires_at=UNTIL) for i in range(2)]
    other = row("B", minutes=-9)
    fill(sql, [*rows, *[row("A", minutes=-5 + i) for i in range(3)], other])
    store, limits = Store(sql), {"A": ClaimLimit(max_running=3)}
    with sql.engine.connect() as writer:  # a long transaction writing another pipeline
        writer.execute(update(pipelines).where(pipelines.c.uuid == other["uuid"]).values(priority=1))
        claimed = claim(store, "w1", 10, limits, runnable=frozenset({("A", 1)}))
        assert len(claimed) == 1
        assert lease_rows(sql) == set(claimed)  # entered, its new leases kept; the stored ones not copied
        writer.commit()
    assert claim(store, "w2", 10, limits, runnable=frozenset({("A", 1)})) == []
    assert len(lease_rows(sql) or ()) == 3  # entered now: the 3 live leases copied


def test_a_name_not_entered_in_time_is_not_tried_again_at_every_claim(
    sql: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (review of 0023): while a transaction keeps the pipelines table (a long
    import, a session left idle in its transaction), each try to enter a name waits for it
    (0023 queued a SHARE lock that held every writer of pipelines back meanwhile). Claims come
    every few milliseconds; they must not try again each time, or every claim waits."""
    if sql.engine.dialect.name != "postgresql":
        pytest.skip("SQLite counts the leases on the pipelines table")
    monkeypatch.setattr(postgresql_leases, "ENTRY_WAIT", 0.1)
    other = row("B", minutes=-9)
    fill(sql, [*[row("A", minutes=-5 + i) for i in range(4)], other])
    store, limits, runnable = Store(sql), {"A": ClaimLimit(max_running=1)}, frozenset({("A", 1)})
    caplog.set_level("INFO", logger=postgresql_leases.logger.name)
    with sql.engine.connect() as writer:  # a long transaction writing another pipeline
        writer.execute(update(pipelines).where(pipelines.c.uuid == other["uuid"]).values(priority=1))
        first = claim(store, "w1", 10, limits, runnable=runnable)
        for _ in range(3):  # the claims that follow count from the pipelines without waiting
            assert claim(store, "w2", 10, limits, runnable=runnable) == []
        writer.commit()
    assert len(first) == 1
    tries = [r for r in caplog.records if "counted from the pipelines for now" in r.getMessage()]
    assert len(tries) == 1, [r.getMessage() for r in tries]


def test_a_lease_taken_before_its_pipeline_was_pending_is_counted_once_it_is(sql: Any) -> None:
    """Regression (review of 0023): ``claim_one`` leases a pipeline that has not started
    (status created); it counts for ``max_running`` once it is pending. Leased so before its
    name was entered for ``pipeline_leases``, it was not copied (only pending rows were), and
    its first transition (to pending, the lease kept) fires no trigger: never counted."""
    started = row("A", minutes=-20, status="created", lease_owner="w0", lease_expires_at=UNTIL)
    rows = [row("A", minutes=-9 + i) for i in range(2)]
    fill(sql, [started, *rows])
    store, limits = Store(sql), {"A": ClaimLimit(max_running=1)}
    assert claim(store, "w1", 10, limits) == [rows[0]["uuid"]]  # the one that had not started counts not yet
    with sql.engine.begin() as connection:
        connection.execute(  # the claimed one ended; the started one's first transition
            update(pipelines).where(pipelines.c.uuid == rows[0]["uuid"]).values(status="finished", lease_owner=None)
        )
        connection.execute(update(pipelines).where(pipelines.c.uuid == started["uuid"]).values(status="pending"))
    assert claim(store, "w2", 10, limits) == []  # the started one runs: no room
