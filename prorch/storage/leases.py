"""Keeping leases alive while a worker holds pipelines, and knowing, before each hook, that the
lease is still ours: a hook starts only while its lease is sure to be live for a safe margin."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType

from prorch.model.clock import Clock
from prorch.model.exceptions import ConcurrentUpdateError, LeaseLostError, RepositoryError
from prorch.model.records import PipelineRecord
from prorch.storage.backend import Write
from prorch.storage.store import Store
from prorch.storage.ticker import Ticker

logger = logging.getLogger("prorch.storage.leases")

SAFE_MARGIN = 1 / 3
"""The part of the lease a hook may not start in: a lease last written ``lease_seconds`` ago
minus this margin is renewed before the hook starts (the keeper renews every third anyway)."""


@dataclass
class _Lease:
    token: str
    name: str
    live_until: float  # time.monotonic() before which the stored lease is sure to be live
    claimed_at: datetime | None = None  # the claim's time (its lease's end less lease_seconds)
    releasing: bool = False  # our next write gives the lease up: a refused renewal is no loss


class LeaseKeeper:
    """Renews, every third of the lease length, the leases of every pipeline the worker claimed
    and has not released, each by the token it was claimed with, and answers, before a hook
    starts, whether the lease is sure to be live (``confirm``).

    When a lease was last written is measured on this process's monotonic clock, from just
    before the time written into it was read: the lease is live at least ``lease_seconds`` from
    then, whatever the wall clock does. A renewal that is refused means the lease was lost (it
    ran out and another worker claimed the pipeline): it is logged and counted (``on_lost``),
    the pipeline starts no more hooks here, and its next write is refused by compare-and-set. A
    pipeline whose hook has run past its time limit is renewed no more, so that another worker
    can take it over when this one is stuck. No error stops the keeper.
    """

    def __init__(
        self, store: Store, lease_seconds: float, clock: Clock, on_lost: Callable[[str], None] | None = None
    ) -> None:
        self.store = store
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.on_lost = on_lost
        self._held: dict[str, _Lease] = {}  # pipeline uuid -> its lease as we last wrote it
        self._lost: set[str] = set()
        self._limits: dict[str, datetime] = {}  # pipeline uuid -> renew no later than this
        self._unsettled: dict[str, _Lease] = {}  # pipeline uuid -> a lease to give back
        self._lock = threading.Lock()
        self._ticker = Ticker("prorch-lease-keeper", lease_seconds / 3, self.renew_all, on_error=self._turn_failed)

    def __enter__(self) -> LeaseKeeper:
        if self.store.can_claim:
            self._ticker.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._ticker.stop()

    def hold(self, records: Iterable[PipelineRecord], since: float) -> None:
        """Keep the leases of ``records``, claimed with a lease time read after
        ``time.monotonic()`` was ``since``."""
        until = since + self.lease_seconds
        with self._lock:
            for record in records:
                if record.lease_owner is not None:
                    expires = record.lease_expires_at
                    claimed_at = expires - timedelta(seconds=self.lease_seconds) if expires else None
                    self._held[record.uuid] = _Lease(record.lease_owner, record.name, until, claimed_at)

    def drop(self, uuid: str) -> None:
        """The pipeline's advance is over: its lease was released, or is left to run out."""
        with self._lock:
            self._held.pop(uuid, None)
            self._limits.pop(uuid, None)
            self._lost.discard(uuid)

    def give_back_later(self, uuid: str) -> None:
        """The advance of ``uuid`` ended because the store was unreachable, or a write's answer
        was lost (``UnconfirmedWriteError``): its lease is most likely still stored as ours,
        with nothing of it running here. ``give_back`` expires it
        once the store answers, so that the pipeline resumes then, not when the lease runs out."""
        with self._lock:
            lease = self._held.get(uuid)
            if lease is not None:
                self._unsettled[uuid] = lease

    def give_back(self) -> None:
        """Expire the leases ``give_back_later`` set aside, one by one (rare: after an outage;
        each reads its pipeline for its hook mark), by compare-and-set on their tokens: a lease
        released, run out or taken over since is left alone; while the store fails, they wait
        for the next call."""
        with self._lock:
            pending = list(self._unsettled.items())
        for uuid, lease in pending:
            try:
                given = self._give_back(uuid, lease)
            except RepositoryError:
                return  # still unreachable: the next call tries again
            with self._lock:
                self._unsettled.pop(uuid, None)
            if given:
                logger.info(
                    "pipeline %s: gave its lease back, its advance ended on a store failure (unreachable, or "
                    "an answer lost); it resumes at the next claim", uuid, extra={"pipeline_uuid": uuid},
                )  # fmt: skip

    def _give_back(self, uuid: str, lease: _Lease) -> bool:
        """Expire one lease of ours. A hook mark stored under it is ours too, and no crash: the
        hook ended here and only its result was lost, so the mark goes with the lease (else the
        next claim charges a crash, counted towards quarantine, and runs the pipeline alone).
        A mark older than our claim is a dead worker's (its lease ran out first, at least two
        thirds of a lease after its last renewal) and stays, to be charged."""
        now = self.clock.now()
        record = self.store.get_pipeline(uuid) if lease.claimed_at is not None else None
        mark = record.hook_started_at if record is not None else None
        ours = lease.claimed_at is not None and mark is not None and mark >= lease.claimed_at - self._skew
        if record is None or record.lease_owner != lease.token or not ours:
            return self.store.renew_lease(uuid, lease.token, now)
        stored = self.store.tracking([record])
        record.lease_expires_at, record.hook_started_at, record.hook_shared = now, None, False
        try:
            self.store.commit_write(Write.of([record], snapshots=stored, token=lease.token))
        except ConcurrentUpdateError:
            return False  # written since it was read: released, taken over or cancelled
        return True

    @property
    def _skew(self) -> timedelta:
        """How far two clocks may disagree for a mark to still count as ours (see ``_give_back``)."""
        return timedelta(seconds=self.lease_seconds / 3)

    def limit(self, uuid: str, until: datetime | None) -> None:
        """Renew the lease of ``uuid`` only while the clock is before ``until`` (None: always)."""
        with self._lock:
            if until is None:
                self._limits.pop(uuid, None)
            else:
                self._limits[uuid] = until

    def renewed(self, uuid: str, since: float) -> None:
        """A write that renewed the lease of ``uuid`` was stored; the lease time it wrote was
        read after ``time.monotonic()`` was ``since``."""
        with self._lock:
            lease = self._held.get(uuid)
            if lease is not None:
                lease.live_until = max(lease.live_until, since + self.lease_seconds)

    def releasing(self, uuid: str) -> None:
        """Our next write of ``uuid`` gives its lease up (a renewal refused after it is no loss)."""
        with self._lock:
            lease = self._held.get(uuid)
            if lease is not None:
                lease.releasing = True

    def confirm(self, uuid: str) -> None:
        """Return only if the lease of ``uuid`` is sure to be live for the safe margin, renewing
        it first (compare-and-set on our token) when it was last written too long ago. Raises
        ``LeaseLostError`` when it was lost, ``RepositoryError`` when the store could not renew
        it; a pipeline this keeper does not hold (a store without leases) passes."""
        margin = self.lease_seconds * SAFE_MARGIN
        with self._lock:
            if uuid in self._lost:
                raise LeaseLostError(f"pipeline {uuid}: this worker lost its lease; not starting its hook", uuid=uuid)
            lease = self._held.get(uuid)
            if lease is None or time.monotonic() < lease.live_until - margin:
                return
            token = lease.token
        since = time.monotonic()
        try:
            renewed = self._renew(uuid, token, since)
        except RepositoryError as exc:
            raise RepositoryError(f"pipeline {uuid}: could not renew its lease before a hook: {exc}") from exc
        if not renewed:
            raise LeaseLostError(f"pipeline {uuid}: its lease ran out and another worker took it", uuid=uuid)
        if time.monotonic() >= since + self.lease_seconds - margin:
            raise RepositoryError(f"pipeline {uuid}: renewing its lease took too long to start a hook safely")

    def renew_all(self) -> None:
        """Renew every lease held, unless past its hook's limit, in one write of the store
        (``Store.renew_leases``: one per lease would fall behind under load); a failure is logged."""
        since = time.monotonic()
        now = self.clock.now()
        with self._lock:
            held = [(uuid, lease.token) for uuid, lease in self._held.items() if self._limits.get(uuid, now) >= now]
        if held:
            self._renew_held(held, since, now + timedelta(seconds=self.lease_seconds))
        self.give_back()

    def _renew_held(self, held: list[tuple[str, str]], since: float, until: datetime) -> None:
        """Renew ``held`` together: each renewed is noted, each refused told lost."""
        try:
            renewed, failed = self.store.renew_leases(held, until)
        except Exception as exc:  # the store is down: the leases may lapse; confirm() and the CAS still guard
            uuids = [uuid for uuid, _token in held]
            if len(uuids) == 1:
                logger.warning("could not renew the lease of pipeline %s: %s", uuids[0], exc)
            else:
                logger.warning("could not renew the leases of %d pipelines (%s): %s", len(uuids), ", ".join(uuids), exc)
            return
        for uuid, token in held:
            if uuid in renewed:
                self.renewed(uuid, since)
            elif uuid in failed:  # a store renewing one lease at a time: this one alone failed
                logger.warning("could not renew the lease of pipeline %s: %s", uuid, failed[uuid])
            else:
                self._refused(uuid, token)

    def _renew(self, uuid: str, token: str, since: float) -> bool:
        """Renew one lease (before a hook); False (and the loss told) when it was refused."""
        if self.store.renew_lease(uuid, token, self.clock.now() + timedelta(seconds=self.lease_seconds)):
            self.renewed(uuid, since)
            return True
        self._refused(uuid, token)
        return False

    def taken(self, uuid: str, owner: str | None) -> None:
        """A write of ours failed, and read again the pipeline's lease is ``owner``'s, not our
        token: lost (told once) when another worker holds it, or released it (it held it). A
        lease released (``owner`` None) when our write gave it up is no loss: that write was
        most likely stored and only its answer lost (a dropped connection after the COMMIT)."""
        with self._lock:
            lease = self._held.get(uuid)
            if lease is None or lease.token == owner:
                return
            if owner is None and lease.releasing:
                del self._held[uuid]
                return
        self._refused(uuid, lease.token, written=True)

    def _refused(self, uuid: str, token: str, *, written: bool = False) -> None:
        with self._lock:
            lease = self._held.get(uuid)
            if lease is None or lease.token != token:
                return  # dropped meanwhile
            del self._held[uuid]
            if lease.releasing and not written:
                return  # most likely our own release was stored first; a refused write would say otherwise
            self._lost.add(uuid)
        logger.warning(
            "lease of pipeline %s was lost: it ran out and another worker claimed it; this worker starts "
            "none of its hooks from now on and its writes are refused (a hook already running goes on)",
            uuid, extra={"pipeline_uuid": uuid},
        )  # fmt: skip
        if self.on_lost is not None:
            try:
                self.on_lost(lease.name)
            except Exception:  # a metrics observer must not stop the keeper
                logger.exception("telling a lost lease of pipeline %s failed", uuid)

    def _turn_failed(self, exc: Exception) -> None:
        """A turn of the keeper's thread failed (e.g. the clock could not be read); the next turn tries again."""
        logger.warning("lease keeper: renewing failed, trying again in %.1fs: %s", self._ticker.every, exc)
