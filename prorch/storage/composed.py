"""The backend contract over per-model repositories that have every capability: what the
shipped backends (``repositories``: memory, SQL, TinyDB) build on. Each backend is a callable
``model -> repository`` as before; this base turns the engine's verbs into calls on those
repositories, typed, with no capability left to detect. The listing, counting and retention
queries default to Python over the repositories' searches, which a store with indexes (SQL)
overrides."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, Protocol

from prorch.model.due import ClaimRequest, Runnable, can_run
from prorch.model.exceptions import LeaseLostError
from prorch.model.pauses import Paused
from prorch.model.records import (
    EventRecord,
    JSONDict,
    MessageRecord,
    PipelineRecord,
    Record,
    StepRecord,
    StreamRecord,
    to_utc,
)
from prorch.model.status import Status
from prorch.storage import listing
from prorch.storage.backend import Lease
from prorch.storage.commits import Committer, call, chunks, conflict
from prorch.storage.repository import PipelineQuery, PipelineStats, VersionGroup
from prorch.storage.wakeups import Bell

MODELS = (PipelineRecord.MODEL, StepRecord.MODEL, EventRecord.MODEL, MessageRecord.MODEL)
"""The models of a user's four-method repository (``IRepository``)."""
OWNED = (*MODELS[1:], StreamRecord.MODEL)
"""The models of a shipped backend whose rows belong to a pipeline: deleted with it."""
_UPDATE_ACTION = {model: f"update a {model} record" for model in (PipelineRecord.MODEL, StepRecord.MODEL)}
"""What ``write_record`` says failed, made once rather than at every write."""


class FullRepository(Protocol):
    """One model's table of a shipped backend: the seed's four methods and every capability."""

    model: str

    def get(self, uuid: str) -> JSONDict | None: ...
    def save(self, data: JSONDict) -> Any: ...
    def update(self, uuid: str, data: JSONDict) -> Any: ...
    def search(self, filter: list[Any]) -> list[JSONDict]: ...  # noqa: A002 - the seed's name
    def search_many(self, field: str, values: list[Any]) -> list[JSONDict]: ...
    def delete_by(self, field: str, values: list[Any]) -> int: ...
    def compare_and_set(self, uuid: str, expected_revision: int, data: JSONDict) -> bool: ...
    def search_due(self, now: datetime, limit: int) -> list[JSONDict]: ...
    def claim(self, request: ClaimRequest) -> list[JSONDict]: ...
    def claim_one(self, uuid: str, now: datetime, owner: str, lease_expires_at: datetime) -> JSONDict | None: ...
    def renew_lease(self, uuid: str, owner: str, lease_expires_at: datetime) -> bool: ...
    def renew_leases(self, leases: Sequence[Lease], lease_expires_at: datetime) -> set[str]: ...
    def unread_messages(
        self, pipeline_uuid: str, name: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[JSONDict]: ...
    def has_unread_messages(self, pipeline_uuid: str) -> bool: ...
    def last_sent_at(self, pipeline_uuid: str) -> datetime | None: ...


class RepositoryBackend(Committer):
    """``prorch.storage.backend.Backend`` over ``self(model)``'s repositories."""

    thread_safe = True
    can_claim = True
    guards_concurrency = True
    has_transactions = True
    partial_update = True
    commits_at_once = 1
    """How many group commits a worker may have in flight at once while its hooks are slow
    (``prorch.engine.slots``): 1 where writers take one lock (SQLite, TinyDB, memory, a
    user's repository); more where the server overlaps commits' log flushes (PostgreSQL)."""
    owned: tuple[str, ...] = OWNED
    """The models deleted with their pipeline."""

    def __call__(self, model: str) -> Any:  # pragma: no cover - each backend gives its repositories
        raise NotImplementedError

    def table(self, model: str) -> FullRepository:
        """The repository of ``model``, made once."""
        tables: dict[str, FullRepository] | None = self.__dict__.get("_by_model")
        if tables is None:
            tables = self.__dict__["_by_model"] = {}
        found = tables.get(model)
        if found is None:
            found = tables[model] = self(model)
        return found

    # --- reading -------------------------------------------------------------------------------

    def get(self, model: str, uuid: str) -> JSONDict | None:
        return self.table(model).get(uuid)

    def search(self, model: str, field: str, value: object) -> list[JSONDict]:
        return self.table(model).search([field, value])

    def search_many(self, model: str, field: str, values: list[object]) -> list[JSONDict] | None:
        return self.table(model).search_many(field, values)

    def due(self, now: datetime, limit: int, runnable: Runnable | None) -> list[JSONDict]:
        wanted = limit
        while True:  # the index knows nothing of classes: read more until enough are runnable
            rows = self.table(PipelineRecord.MODEL).search_due(now, wanted)
            paused = self.paused()
            found = [row for row in rows if can_run(row, runnable) and not paused.holds_row(row)]
            if len(found) >= limit or len(rows) < wanted:
                return found[:limit]
            wanted *= 4

    def all_pipelines(self) -> list[JSONDict]:
        return [row for status in Status for row in self.search(PipelineRecord.MODEL, "status", status.value)]

    def query_pipelines(self, query: PipelineQuery) -> tuple[list[JSONDict], int | None]:
        """In Python, over every pipeline: a store without indexes."""
        rows = {str(row["uuid"]): row for row in self.all_pipelines()}
        records, total = listing.filtered_page([PipelineRecord.from_dict(row) for row in rows.values()], query)
        return [rows[record.uuid] for record in records], total

    def pipeline_stats(self, now: datetime, ended_since: datetime) -> PipelineStats:
        return listing.stats_of([PipelineRecord.from_dict(row) for row in self.all_pipelines()], now, ended_since)

    def version_groups(self) -> list[VersionGroup]:
        return listing.version_groups_of([PipelineRecord.from_dict(row) for row in self.all_pipelines()])

    def ended_before(self, statuses: list[str], before: datetime, limit: int) -> list[str]:
        rows = [row for status in statuses for row in self.search(PipelineRecord.MODEL, "status", status)]
        return [str(row["uuid"]) for row in rows if self.purgeable(row, statuses, before)][:limit]

    def purgeable(self, row: JSONDict, statuses: list[str], before: datetime) -> bool:
        """Retention's rule, checked on a stored pipeline."""
        record = PipelineRecord.from_dict(row)
        return (
            record.status.value in statuses
            and record.updated_at is not None
            and record.updated_at < before
            and (record.parent_uuid is None or self.get(PipelineRecord.MODEL, record.parent_uuid) is None)
        )

    def unread_messages(
        self, pipeline_uuid: str, name: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[JSONDict]:
        return self.table(MessageRecord.MODEL).unread_messages(pipeline_uuid, name, after, limit)

    def has_unread_messages(self, pipeline_uuid: str) -> bool:
        return self.table(MessageRecord.MODEL).has_unread_messages(pipeline_uuid)

    def last_sent_at(self, pipeline_uuid: str) -> datetime | None:
        found = self.table(MessageRecord.MODEL).last_sent_at(pipeline_uuid)
        return to_utc(found) if found is not None else None

    def server_time(self) -> datetime | None:
        return None

    # --- claiming ------------------------------------------------------------------------------

    def claim(self, request: ClaimRequest) -> list[JSONDict]:
        return self.table(PipelineRecord.MODEL).claim(request)

    def claim_one(self, uuid: str, now: datetime, owner: str, lease_expires_at: datetime) -> JSONDict | None:
        return self.table(PipelineRecord.MODEL).claim_one(uuid, now, owner, lease_expires_at)

    def renew_lease(self, uuid: str, owner: str, lease_expires_at: datetime) -> bool:
        return self.table(PipelineRecord.MODEL).renew_lease(uuid, owner, lease_expires_at)

    batch_renewal = True
    """``BatchRenewal``: the keeper's leases in one write (the pipelines' repository's)."""

    def renew_leases(self, leases: Sequence[Lease], lease_expires_at: datetime) -> set[str]:
        return self.table(PipelineRecord.MODEL).renew_leases(leases, lease_expires_at)

    # --- writing (the record-by-record strategy of ``Committer``) ------------------------------

    def write_record(self, record: PipelineRecord | StepRecord, expected: int, data: JSONDict) -> None:
        cas = self.table(record.MODEL).compare_and_set
        if not call(_UPDATE_ACTION[record.MODEL], cas, record.uuid, expected, data):
            raise conflict(record.MODEL, record.uuid, expected)

    def update_message(self, message: MessageRecord) -> None:
        call("update a message", self.table(message.MODEL).update, message.uuid, message.to_dict())

    def save(self, records: Sequence[Record]) -> None:
        for model, batch in chunks(records):
            self.save_rows(model, [record.to_dict() for record in batch])

    def save_rows(self, model: str, rows: list[JSONDict]) -> None:
        """Insert rows of one model (one call each here; a store with a batch insert overrides)."""
        save = self.table(model).save
        for row in rows:
            call(f"save a {model} record", save, row)

    def delete_pipelines(self, uuids: list[str], statuses: list[str], before: datetime) -> int:
        """Each pipeline checked inside the transaction, the pipelines last: an interrupted
        delete leaves them to be purged again rather than steps without a pipeline."""
        with self.transaction():
            rows = [self.get(PipelineRecord.MODEL, uuid) for uuid in uuids]
            chosen = [str(row["uuid"]) for row in rows if row is not None and self.purgeable(row, statuses, before)]
            for model in self.owned:
                call("delete records", self.table(model).delete_by, "pipeline_uuid", chosen)
            return call("delete pipelines", self.table(PipelineRecord.MODEL).delete_by, "uuid", chosen)

    def check_deletable(self) -> None:
        """Every shipped backend deletes."""

    def session(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def lock_key(self, key: str) -> None:
        """Nothing: ``transaction()`` holds the store's only write lock here (memory, TinyDB,
        SQLite), or the store has no transactions (a user's repository: one process only)."""

    def lock_keys(self, keys: Sequence[str]) -> None:
        """Nothing, as ``lock_key``."""

    # --- writes while a lease holds (``emit(now=True)``, live ``progress()``, a rerun) ---------

    @contextlib.contextmanager
    def while_leased(self, pipeline_uuid: str, token: str | None) -> Iterator[None]:
        """A transaction whose block runs only while lease ``token`` holds the pipeline (None:
        while it is stored), else ``LeaseLostError`` before it runs. The lease is read by
        ``held_lease``, which keeps any claim or purge off the row until the block commits."""
        with self.transaction():
            found = call("read a pipeline's lease", self.held_lease, pipeline_uuid)
            if found is None or (token is not None and found.get("lease_owner") != token):
                raise LeaseLostError(f"pipeline {pipeline_uuid}: its lease is lost; nothing stored", uuid=pipeline_uuid)
            yield

    def held_lease(self, pipeline_uuid: str) -> JSONDict | None:
        """Inside ``while_leased``'s transaction: the pipeline's row (``lease_owner`` at least),
        unchanged by any claim or delete until the transaction ends. Here the transaction
        already holds the store's only write lock (memory, TinyDB, SQLite); a store with row
        locks takes a shared lock on the row (SQL: ``FOR SHARE``)."""
        return self.get(PipelineRecord.MODEL, pipeline_uuid)

    live_progress = True
    """True when ``write_progress`` stores a step's progress ahead of its transition."""

    def write_progress(self, pipeline_uuid: str, step_uuid: str, token: str | None, progress: JSONDict) -> bool:
        """Store the step's ``progress`` column alone, ``while_leased``; False, storing nothing,
        once lease ``token`` is lost. ``revision`` is left as it is: the hook's transition,
        written by compare-and-set on it, is not refused, and writes the last progress after this."""
        try:
            with self.while_leased(pipeline_uuid, token):
                call("store a step's progress", self.table(StepRecord.MODEL).update, step_uuid, {"progress": progress})
        except LeaseLostError:
            return False
        return True

    # --- streams (a store with an index by (pipeline, seq) overrides: SQL) ----------------------

    def stream_entries(self, pipeline_uuid: str, after: int, limit: int) -> list[JSONDict]:
        rows = [row for row in self._stream_rows(pipeline_uuid) if int(row["seq"]) > after]
        return rows[:limit]

    def last_stream_seq(self, pipeline_uuid: str) -> int:
        rows = self._stream_rows(pipeline_uuid)
        return int(rows[-1]["seq"]) if rows else 0

    def _stream_rows(self, pipeline_uuid: str) -> list[JSONDict]:
        """The pipeline's entries in order: one search of its rows (memory, TinyDB)."""
        return sorted(self.search(StreamRecord.MODEL, "pipeline_uuid", pipeline_uuid), key=lambda row: int(row["seq"]))

    # --- pauses (each backend stores the rows; resuming wakes workers) --------------------------

    def pauses(self) -> list[JSONDict]:  # pragma: no cover - each backend's
        raise NotImplementedError

    def add_pause(self, row: JSONDict) -> bool:  # pragma: no cover - each backend's
        raise NotImplementedError

    def paused(self) -> Paused:
        """The stored pauses, for a claim's filter in Python."""
        return Paused.of_rows(self.pauses())

    def remove_pause(self, scope: str) -> JSONDict | None:
        with self.transaction():
            found = self.drop_pause(scope)
            if found is not None:
                self.work_arrived()
        if found is not None:
            self.work_stored()
        return found

    def drop_pause(self, scope: str) -> JSONDict | None:  # pragma: no cover - each backend's
        """Delete the pause row of ``scope`` and return it (None: none was stored)."""
        raise NotImplementedError

    # --- waiting (prorch.storage.wakeups) -------------------------------------------------------

    def wake_bell(self) -> Bell:
        """The bell this store's writers of this process ring (one per backend object here; a
        store on a file shares one per file)."""
        found: Bell | None = self.__dict__.get("_bell")
        if found is None:
            found = self.__dict__.setdefault("_bell", Bell())
        return found

    def work_stored(self) -> None:
        self.wake_bell().ring()

    def wait_for_work(self, timeout: float) -> bool:
        """This process's writes ring the bell; then one look for other processes' writes."""
        return self.wake_bell().wait(timeout) or self.work_elsewhere()

    def work_elsewhere(self) -> bool:
        """Whether another process may have made work since the last look (a cheap check,
        once per ``wait_for_work``); False where no other process can write (memory)."""
        return False

    def next_due_at(self, now: datetime) -> datetime | None:
        """In Python, over the pending pipelines no live lease holds: a store without indexes."""
        later = []
        for row in self.search(PipelineRecord.MODEL, "status", Status.PENDING.value):
            moment, lease = _moment(row.get("next_run_at")), _moment(row.get("lease_expires_at"))
            if moment is not None and moment > now and (lease is None or lease <= now):
                later.append(moment)
        return min(later, default=None)


def _moment(value: object) -> datetime | None:
    """A stored timestamp (ISO text or datetime) as an aware datetime."""
    if isinstance(value, str):
        return to_utc(datetime.fromisoformat(value))
    return to_utc(value) if isinstance(value, datetime) else None
