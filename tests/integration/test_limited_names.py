"""The lease table when a class's limit is removed (PostgreSQL, migrations 0023 and 0024): a name
entered in ``pipeline_limited_names`` by its first limited claim leaves it once no claim has
limited it for ``LIMITED_NAME_KEPT``, with its lease rows, so that its leases are no longer
copied after a deploy took its limit away; a worker of the older code that still limits it
stays right (it finds the name gone under its lock, counts from the pipelines and enters it
again). Two stores on one database stand for the two code versions' workers: each keeps its
own cache of the names it entered."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text, update

from prorch.model.limit_rules import ClaimLimit
from prorch.storage.store import Store
from repositories import from_url, postgresql_leases
from repositories.schema import pipelines
from tests.integration.test_claims import NOW, claim, fill, lease_rows, row

LIMITED = {"A": ClaimLimit(max_running=2)}


@pytest.fixture
def two_codes(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    """The older code's store (A limited) and the newer one's (A's limit removed), each claim of
    each refreshing and dropping names (no pause between two)."""
    monkeypatch.setattr(postgresql_leases, "KEEP_EVERY", 0.0)
    # two backends (one a URL): as two processes', each with its own cache of the names it entered
    older, newer = (from_url(f"{postgres_url}?application_name={code}") for code in ("older", "newer"))
    assert older is not newer
    yield older, newer
    older.dispose()
    newer.dispose()


def listed(backend: Any) -> dict[str, bool]:
    with backend.engine.connect() as connection:
        found = connection.execute(text("SELECT name, ready FROM pipeline_limited_names"))
        return {name: ready for name, ready in found}


def a_day_passes(backend: Any) -> None:
    """No claim has limited any name for more than ``LIMITED_NAME_KEPT``."""
    with backend.engine.begin() as connection:
        connection.execute(text("UPDATE pipeline_limited_names SET limited_at = now() - interval '2 days'"))


def live_leases(backend: Any, name: str) -> set[str]:
    with backend.engine.connect() as connection:
        query = text("SELECT uuid FROM pipelines WHERE name = :name AND lease_owner IS NOT NULL AND status = 'pending'")
        return set(connection.execute(query, {"name": name}).scalars())


def test_the_lease_table_when_a_class_s_limit_is_removed(two_codes: tuple[Any, Any]) -> None:
    """Regression (#28, 0023's side table): a name stayed in ``pipeline_limited_names`` for ever,
    so once a deploy removed its class's limit, every lease and release of it still wrote a row
    of ``pipeline_leases`` (and left a dead tuple). Now: kept while any claim limits it, dropped
    with its rows a day after the last; the newer code claims all of it (no ``max_running``);
    the older code, which still limits it and had it cached as ready, counts its live leases
    from the pipelines (not the emptied table, which would let it take 2 more) and enters it
    again; once the leases end, every pipeline is claimed, none stranded."""
    older, newer = two_codes
    rows = [row("A", minutes=-30 + i) for i in range(8)]
    fill(older, rows)
    old_store, new_store = Store(older), Store(newer)

    first = claim(old_store, "old-1", 3, LIMITED)  # enters A: its leases are kept apart
    assert len(first) == 2 and listed(older) == {"A": True} and lease_rows(older) == set(first)
    second = claim(new_store, "new-1", 3)  # no limit in the new code: not held to 2
    assert len(second) == 3 and listed(older) == {"A": True}  # limited a moment ago: kept
    assert lease_rows(older) == {*first, *second}  # copied while A is listed

    a_day_passes(older)  # the older workers are gone for a day: nothing limits A
    third = claim(new_store, "new-2", 1)
    assert len(third) == 1
    assert listed(older) == {} and lease_rows(older) == set()  # dropped, its rows with it
    assert lease_rows(older) == set()  # and the new lease was not copied

    # an older worker still running (A cached as ready there) must not count from the empty table
    assert claim(old_store, "old-2", 3, LIMITED) == []  # 6 live leases of A: no room under 2
    assert listed(older) == {"A": True}  # entered again by the code that limits it
    assert lease_rows(older) == live_leases(older, "A")  # with every live lease copied

    later = NOW + timedelta(minutes=6)  # every lease ran out: the rest, and the expired ones, are due
    rest = claim(new_store, "new-3", 100, at=later)
    assert sorted(rest) == sorted(r["uuid"] for r in rows)  # nothing stranded
    assert lease_rows(older) == set(rest)  # A is listed again (by the older code): copied


def test_a_name_a_claim_holds_is_not_dropped_under_it(two_codes: tuple[Any, Any]) -> None:
    """The drop waits for no claim: a claim of the name holds its lock while it counts and
    leases, and the drop of a stale name is skipped while it does (tried at a later refresh),
    so a claim never counts from a table emptied between its look and its count."""
    older, newer = two_codes
    fill(older, [row("A", minutes=-30 + i) for i in range(3)])
    assert len(claim(Store(older), "old-1", 3, LIMITED)) == 2
    a_day_passes(older)
    with older.engine.begin() as connection:  # a claim of A holding its lock
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('prorch:limit:A'))"))
        assert postgresql_leases.keep_limited_names(newer.engine, []) == []
    assert listed(older) == {"A": True}
    assert postgresql_leases.keep_limited_names(newer.engine, []) == ["A"]  # the lock is free again
    assert listed(older) == {}


def test_the_names_a_worker_limits_are_refreshed_not_dropped(two_codes: tuple[Any, Any]) -> None:
    """A worker that limits a name refreshes it at its claims (every ``KEEP_EVERY`` seconds),
    whether or not any of it is due: a day without a claim of it does not drop it."""
    older, newer = two_codes
    fill(older, [row("A", minutes=-1)])
    assert len(claim(Store(older), "old-1", 1, LIMITED)) == 1
    with older.engine.begin() as connection:
        connection.execute(update(pipelines).values(status="finished", lease_owner=None))
    a_day_passes(older)
    assert claim(Store(older), "old-2", 1, LIMITED) == []  # nothing due; A refreshed all the same
    assert postgresql_leases.keep_limited_names(newer.engine, []) == []
    assert listed(older) == {"A": True}
