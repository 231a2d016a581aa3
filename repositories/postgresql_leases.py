"""PostgreSQL's table of live leases for ``max_running`` (migration 0023): one row per leased
pipeline of a limited name in ``pipeline_leases``, kept by triggers on pipelines, so that no
index of the pipelines table holds the lease and a claim and a release can be HOT updates.

Only names in ``pipeline_limited_names`` get rows (a name without limits costs the trigger
one look-up and leaves no dead tuple). A name is entered there by the first limited claim of
it (``limited_name_ready``), and is ``ready`` (counted from the table) once the leases stored
before its entry were copied in: the triggers enter every lease written after it, whoever
writes it (this prorch, ``claim_one``, an older prorch writing ``lease_owner`` on the row)."""

from __future__ import annotations

import logging

from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

logger = logging.getLogger(f"prorch.{__name__}")

READY = text("SELECT ready FROM pipeline_limited_names WHERE name = :name")
ENTER = text("INSERT INTO pipeline_limited_names (name, ready) VALUES (:name, false) ON CONFLICT (name) DO NOTHING")
LOCK_TIMEOUT = "2s"
"""How long the copy waits for the writers in flight before it gives up for this claim."""
# the writers in flight, whose triggers may have looked before the name was entered, end
# first: the copy sees their leases (and blocks new writers until it commits)
QUIET = text("LOCK TABLE pipelines IN SHARE MODE")
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


def limited_name_ready(engine: Engine, name: str) -> bool:
    """Whether ``name``'s live leases can be counted from ``pipeline_leases``; enters the name
    and copies its stored leases when it was not, once per database (on a connection of its
    own, two commits: the entry first, so that every later lease write sees it; then the copy,
    once the writes in flight have ended, which holds the pipelines' writers back meanwhile).
    False when a writer kept the table longer than the lock timeout: the caller counts from the
    pipelines this time, and tries again next."""
    with engine.connect() as connection:
        if connection.execute(READY, {"name": name}).scalar():
            return True
        connection.execute(ENTER, {"name": name})
        connection.commit()
        try:
            connection.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            connection.execute(QUIET)
            connection.execute(COPY, {"name": name})
            connection.execute(MARK, {"name": name})
            connection.commit()
        except OperationalError as exc:
            connection.rollback()
            logger.info("the leases of %s are counted from the pipelines for now: %s", name, exc.orig)
            return False
    return True
