"""PostgreSQL's table of live leases for ``max_running`` (migration 0023): one row per leased
pipeline of a limited name in ``pipeline_leases``, kept by triggers on pipelines, so that no
index of the pipelines table holds the lease and a claim and a release can be HOT updates.

Only names in ``pipeline_limited_names`` get rows (a name without limits costs the trigger
one look-up and leaves no dead tuple). A name is entered there by the first limited claim of
it (``limited_name_ready``), and is ``ready`` (counted from the table) once the leases stored
before its entry were copied in: the triggers enter every lease written after it, whoever
writes it (this prorch, ``claim_one``, an older prorch writing ``lease_owner`` on the row).

A name leaves the table once no claim has limited it for ``LIMITED_NAME_KEPT`` (migration 0024:
its limit was removed by a deploy): each worker's claims refresh the names they limit every
``KEEP_EVERY`` seconds and drop the stale ones with their lease rows (``keep_limited_names``),
under each name's claim lock, so that a claim counting a name's leases from the table sees
the name and its rows, or neither: it looks whether the name is still there under that lock
(``still_ready``) and else counts from the pipelines, and enters the name again."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from sqlalchemy import Connection, Engine, text

logger = logging.getLogger(f"prorch.{__name__}")

READY = text("SELECT ready FROM pipeline_limited_names WHERE name = :name")
ENTER = text("INSERT INTO pipeline_limited_names (name, ready) VALUES (:name, false) ON CONFLICT (name) DO NOTHING")
ENTRY_WAIT = 2.0
"""Seconds the copy waits for the writers in flight at the entry before it gives up for this
claim (the claim then counts from the pipelines, and tries again later)."""
# the writers in flight at the entry, whose triggers may have looked before the name was there:
# each holds its lock on pipelines until it ends; the copy waits for them, and only them, to end
# (a later writer's trigger sees the name). Polled: no lock of the table, so no writer waits
WRITERS = text(
    "SELECT DISTINCT virtualtransaction FROM pg_locks WHERE locktype = 'relation' "
    "AND relation = CAST('pipelines' AS regclass) AND mode = 'RowExclusiveLock' AND pid <> pg_backend_pid()"
)
STILL_WRITING = text(
    "SELECT count(*) FROM pg_locks WHERE locktype = 'relation' AND relation = CAST('pipelines' AS regclass) "
    "AND mode = 'RowExclusiveLock' AND virtualtransaction = ANY(CAST(:writers AS text[]))"
)
# the created ones too: one leased before it started (``claim_one``) becomes pending with its lease
# kept, which fires no trigger; ended ones not (by ix_pipelines_status_name: the name's live rows
# only, read while the writers wait). The count checks the status
COPY = text(
    "INSERT INTO pipeline_leases (pipeline_uuid, name) "
    "SELECT uuid, name FROM pipelines WHERE name = :name AND status IN ('created', 'pending') "
    "AND lease_owner IS NOT NULL "
    "ON CONFLICT (pipeline_uuid) DO NOTHING"
)
MARK = text("UPDATE pipeline_limited_names SET ready = true WHERE name = :name")


LIMITED_NAME_KEPT = 86_400.0
"""Seconds a name stays in ``pipeline_limited_names`` after the last claim that limited it: a
day, long past any rolling deploy, so that an older prorch (before 0024), which counts from
the table without looking whether its name is still there, is replaced before its name goes."""
KEEP_EVERY = 300.0
"""Seconds between a worker's refreshes of the names it limits (and drops of the stale ones)."""
REFRESH = text(
    "UPDATE pipeline_limited_names SET limited_at = now() WHERE name = ANY(CAST(:names AS text[])) "
    "AND limited_at < now() - make_interval(secs => :every)"
)  # (no write while another worker has refreshed it lately)
STALE = text(
    "SELECT name FROM pipeline_limited_names WHERE limited_at < now() - make_interval(secs => :kept) "
    "AND NOT name = ANY(CAST(:names AS text[])) ORDER BY name"
)
# a claim of the name holds this lock while it counts and claims (``PostgreSQLBackend.lock_name``):
# not waited for, the name is dropped at a later refresh
TRY_LOCK = text("SELECT pg_try_advisory_xact_lock(hashtext(:key))")


def limit_lock_key(name: str) -> str:
    """The advisory lock key of a limited name's claims (``PostgreSQLBackend.lock_name``)."""
    return f"prorch:limit:{name}"


DROP = text(
    "DELETE FROM pipeline_limited_names WHERE name = :name "
    "AND limited_at < now() - make_interval(secs => :kept) RETURNING name"
)
# a row a writer in flight enters after this delete is harmless: the release of its lease
# deletes it, and a count checks the pipeline's own lease
DROP_LEASES = text("DELETE FROM pipeline_leases WHERE name = :name")


def keep_limited_names(engine: Engine, limited: Sequence[str]) -> list[str]:
    """Refresh the names this worker limits (``limited``) and drop those no claim has limited for
    ``LIMITED_NAME_KEPT``, with their lease rows; the names dropped. On a connection of its own,
    one transaction per name dropped, each under the name's claim lock (skipped if a claim holds
    it): a claim that counts from the table sees the name and its rows, or neither."""
    names = sorted(limited)
    dropped = []
    with engine.connect() as connection:
        connection.execute(REFRESH, {"names": names, "every": KEEP_EVERY})
        stale = connection.execute(STALE, {"names": names, "kept": LIMITED_NAME_KEPT}).scalars().all()
        connection.commit()
        for name in stale:
            locked = connection.execute(TRY_LOCK, {"key": limit_lock_key(name)}).scalar()
            if locked and connection.execute(DROP, {"name": name, "kept": LIMITED_NAME_KEPT}).first() is not None:
                connection.execute(DROP_LEASES, {"name": name})
                dropped.append(name)
            connection.commit()
    if dropped:
        logger.info("no claim limits %s any more: their leases are no longer kept apart", ", ".join(dropped))
    return dropped


def still_ready(connection: Connection, name: str) -> bool:
    """Whether ``name`` is still entered and ready, read in the claim's transaction while it holds
    the name's lock (``keep_limited_names`` may have dropped it since this process entered it)."""
    return bool(connection.execute(READY, {"name": name}).scalar())


def limited_name_ready(engine: Engine, name: str) -> bool:
    """Whether ``name``'s live leases can be counted from ``pipeline_leases``; enters the name
    and copies its stored leases when it was not, once per database (on a connection of its
    own, two commits: the entry first, so that every later lease write sees it; then the copy,
    once the writes in flight at the entry have ended; no writer waits for it). False when
    one of them ran longer than ``ENTRY_WAIT``: the caller counts from the pipelines this time,
    and tries again later."""
    with engine.connect() as connection:
        if connection.execute(READY, {"name": name}).scalar():
            return True
        connection.execute(ENTER, {"name": name})
        connection.commit()
        writers = list(connection.execute(WRITERS).scalars())
        connection.commit()
        if writers and not _ended(connection, writers):
            logger.info("the leases of %s are counted from the pipelines for now: writers still in flight", name)
            return False
        connection.execute(COPY, {"name": name})
        connection.execute(MARK, {"name": name})
        connection.commit()
    return True


def _ended(connection: Connection, writers: list[str]) -> bool:
    """Whether the transactions ``writers`` (virtual ids) have all ended within ``ENTRY_WAIT``."""
    deadline, pause = time.monotonic() + ENTRY_WAIT, 0.002
    while True:
        still = connection.execute(STILL_WRITING, {"writers": writers}).scalar_one()
        connection.commit()  # each look a statement of its own (no snapshot held meanwhile)
        if not still:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
