"""The orchestrator's read-only operations on stored pipelines (``Orchestrator.get``, ``query``,
``wait``...), a part of ``Orchestrator`` kept in a module of its own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prorch.model import patches as patch_rules
from prorch.model import substates
from prorch.model.clock import Clock
from prorch.model.exceptions import PipelineNotFoundError, ProrchError, WaitTimeoutError
from prorch.model.keys import check_key, uuid_for_key
from prorch.model.limit_rules import limits_of
from prorch.model.records import EventRecord, PipelineRecord, StepRecord, StreamRecord
from prorch.model.registry import Registry
from prorch.model.status import TERMINAL, Status
from prorch.model.substates import Holds, Limited
from prorch.storage import versions as code_versions
from prorch.storage.listing import PipelinePage
from prorch.storage.repository import PipelineQuery
from prorch.storage.results import result_of
from prorch.storage.store import Store
from prorch.storage.versions import VersionUsage
from prorch.summaries import PipelineState


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


class Reads:
    """Reading pipelines, their steps, results and history; ``Orchestrator`` has these methods."""

    store: Store
    clock: Clock
    registry: Registry

    def list_pipelines(self, status: Status | str | None = None, name: str | None = None) -> list[PipelineRecord]:
        """Stored pipelines, newest first; filtered by status and name when given."""
        found = self.store.pipelines_with_status(Status(status)) if status is not None else self.store.all_pipelines()
        if name is not None:
            found = [p for p in found if p.name == name]
        epoch = datetime.min.replace(tzinfo=self.clock.now().tzinfo)
        return sorted(found, key=lambda p: p.created_at or epoch, reverse=True)

    def query(
        self,
        *,
        status: Status | str | None = None,
        name: str | None = None,
        version: int | None = None,
        tenant: str | None = None,
        key: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        updated_since: datetime | None = None,
        updated_until: datetime | None = None,
        param: tuple[str, str | int | float | bool] | None = None,
        limit: int = 50,
        after: str | None = None,
        count: bool = False,
        state: str | None = None,
        attributes: dict[str, str] | None = None,
    ) -> PipelinePage:
        """A page of stored pipelines, newest first, by the store's indexes where it has them.

        Filters combine; ``since``/``until`` bound ``created_at`` (until excluded), ``param`` is
        ``(field, value)`` on a top-level params field, ``state`` splits pending into running,
        due, waiting, paused, max-running and rate-limited (``prorch.model.substates``),
        ``attributes`` keeps the pipelines that carry every one of those search attributes with
        that value. Pass the page's ``next_after`` as ``after`` for the next page; ``count=True``
        adds the total number of matches."""
        query = PipelineQuery(
            status=Status(status).value if status is not None else None,
            name=name, version=version, tenant=tenant, key=key,
            created_since=since, created_until=until,
            updated_since=updated_since, updated_until=updated_until,
            param=param, limit=limit, count=count, state=state, now=self.clock.now(), attributes=attributes,
            holds=self.holds() if state in substates.SUBSTATES else None,
        )  # fmt: skip
        return self.store.query_pipelines(query, after=after)

    def get(self, uuid: str, *, workers_code: bool = True) -> PipelineState:
        """The pipeline ``uuid`` with its steps in order, its children, and why it is blocked,
        if it is. ``workers_code=False`` says this process has not loaded the workers' code (the
        CLI without ``--app``): a pipeline whose code is missing here is then reported as
        ``code_missing``, not as blocked, since the workers may well run it."""
        record = self._require(uuid)
        steps = sorted(self.store.steps_of(uuid), key=lambda s: (s.position is None, s.position or 0))
        missing = self.blocked_reason(record, steps)
        children = self.store.children_of(uuid)
        if record.status in TERMINAL or not workers_code:  # an ended pipeline waits for nothing
            return PipelineState(record, steps, code_missing=missing, children=children)
        return PipelineState(record, steps, blocked=missing, children=children)

    def result(self, uuid: str) -> Any:
        """The result of pipeline ``uuid``: its last step's output (or its ``Output`` model) once
        it finished, None while it runs; ``PipelineFailedError`` if it failed or was cancelled."""
        record = self._require(uuid)
        return result_of(record, self.store.steps_of(uuid), self.registry)

    def wait(self, uuid: str, timeout: float | None = None, poll: float = 0.2) -> Any:
        """Block until pipeline ``uuid`` ends and return its result (as ``result``); a
        worker elsewhere runs it. ``WaitTimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = min(poll, 0.05)
        while True:
            record = self._require(uuid)
            if record.status in TERMINAL:
                return result_of(record, self.store.steps_of(uuid), self.registry)
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(
                    f"pipeline {uuid} did not end within {timeout:g}s (it is {record.status.value})", uuid=uuid
                )
            pause = delay if deadline is None else max(min(delay, deadline - time.monotonic()), 0)
            time.sleep(pause)
            delay = min(delay * 2, poll)

    def stream(
        self, uuid: str, after: int | None = None, *, follow: bool = True, timeout: float | None = None,
        poll: float = 0.2,
    ) -> Iterator[StreamRecord]:  # fmt: skip
        """The entries of pipeline ``uuid``'s stream (``self.emit``), oldest first, each with its
        cursor ``seq``; after cursor ``after`` when given (resume with the last ``seq`` seen).
        ``follow``: wait for more (polling the store, at most every ``poll`` seconds) until the
        pipeline has ended and its last entries are read; ``WaitTimeoutError`` after
        ``timeout`` seconds. Without ``follow``: the entries stored now. Only what a hook's
        transition stored is ever read: an entry, once read, stays (until the pipeline is purged)."""
        self._require(uuid)
        cursor, deadline, delay = after or 0, _deadline(timeout), min(poll, 0.05)
        while True:
            page = self.store.stream_entries(uuid, cursor)
            yield from page
            if page:
                cursor, delay = page[-1].seq, min(poll, 0.05)
                continue
            if not follow:
                return
            if self._require(uuid).status in TERMINAL:  # its last transition is stored: read after it
                yield from self.stream(uuid, cursor, follow=False)
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(f"pipeline {uuid}'s stream: no end within {timeout:g}s", uuid=uuid)
            time.sleep(delay if deadline is None else max(min(delay, deadline - time.monotonic()), 0))
            delay = min(delay * 2, poll)

    def get_by_key(self, key: str, *, workers_code: bool = True) -> PipelineState:
        """The pipeline created with ``key`` (``create(key=...)``), with its steps (``workers_code``
        as for ``get``): the one that has not ended, else the newest (a key used with
        ``if_running`` or ``debounce`` may name several over time)."""
        found = self.store.pipelines_with_key(check_key(key))
        live = [record for record in found if record.status not in TERMINAL]
        chosen = (live or found)[-1].uuid if found else uuid_for_key(key)
        try:
            return self.get(chosen, workers_code=workers_code)
        except PipelineNotFoundError:
            raise PipelineNotFoundError(f"no pipeline was created with key {key!r}", uuid=chosen) from None

    def history(self, uuid: str) -> list[EventRecord]:
        """The pipeline's events, oldest first."""
        self._require(uuid)
        return self.store.events_of(uuid)

    def versions(self, *, workers_code: bool = True) -> list[VersionUsage]:
        """Per pipeline class and version, the live (not ended) pipelines with the oldest one's
        creation time, the ended ones, and per patch the live pipelines with it and those that
        predate it: the code a team can delete (``prorch versions``). Counted by the store (a
        GROUP BY on SQL). ``workers_code=False``: this process has not loaded the workers' code,
        so nothing is said about which versions and patches it declares."""
        return code_versions.summarize(self.store.version_groups(), self.registry if workers_code else None)

    def holds(self) -> Holds:
        """What holds due work back now: the stored pauses, and each class of this process's
        registry at its ``max_running`` or out of its ``rate_limit`` (``prorch.model.substates``).
        A few reads: the pauses, and one count per limited class."""
        now = self.clock.now()
        limited: dict[str, Limited] = {}
        for name, versions in self.registry.pipelines.items():
            limit = limits_of(versions[max(versions)])
            if limit is None:
                continue
            if limit.max_running is not None:
                query = PipelineQuery(name=name, state=substates.RUNNING, now=now, count=True, limit=1)
                running = self.store.query_pipelines(query).total or 0
                if running >= limit.max_running:
                    why = f"max_running {limit.max_running} of {name}: {running} running"
                    limited[name] = Limited(substates.MAX_RUNNING, why)
                    continue
            if limit.rate is not None:
                started = self.store.rate_starts(name, now - limit.rate.period)
                if started >= limit.rate.count:
                    why = f"rate_limit {limit.rate.count} per {limit.rate.seconds:g}s of {name}: {started} started"
                    limited[name] = Limited(substates.RATE_LIMITED, why)
        return Holds(self.store.paused(), limited)

    def held_counts(self) -> dict[str, int]:
        """Pipelines per held state (paused, max-running, rate-limited) and due ones, when a
        pause or a limit holds some (one count each); empty when none does (the usual case, and
        then nothing is counted): what the overview's cards and the metrics' gauges show."""
        holds = self.holds()
        if not holds.paused and not holds.limited:
            return {}
        states = (substates.PAUSED, *substates.LIMITED, substates.DUE)
        return {state: self.query(state=state, count=True, limit=1).total or 0 for state in states}

    def blocked_on_page(self, records: list[PipelineRecord]) -> dict[str, str]:
        """Why each unended pipeline whose class (name, version) is not registered here is
        blocked, by uuid: with the workers' code loaded, those no worker claims (``prorch list``)."""
        found = {}
        for record in records:
            if record.status not in TERMINAL:
                reason = self.blocked_reason(record, [])
                if reason is not None:
                    found[record.uuid] = reason
        return found

    def blocked_reason(self, record: PipelineRecord, steps: list[StepRecord], *, patches: bool = True) -> str | None:
        """Why no worker with this process's code runs the pipeline: its class or a step's is not
        registered, or (``patches``) its recorded patches do not fit the class's."""
        try:
            definition = self.registry.pipeline(record.name, record.version)
            for step in steps:
                self.registry.step(step.name, step.version)
        except ProrchError as exc:
            return str(exc)
        if not patches or record.status in TERMINAL:  # an ended pipeline's patches decide nothing any more
            return None
        return patch_rules.mismatch(definition, record)

    def _require(self, uuid: str) -> PipelineRecord:
        record = self.store.get_pipeline(uuid)
        if record is None:
            raise PipelineNotFoundError(f"no pipeline with uuid {uuid} is stored", uuid=uuid)
        return record
