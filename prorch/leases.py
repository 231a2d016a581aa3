"""Keeping leases alive while hooks run, so a long hook does not let another worker take over."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import datetime, timedelta
from types import TracebackType

from prorch.clock import Clock
from prorch.records import PipelineRecord
from prorch.store import Store

logger = logging.getLogger("prorch.leases")


class LeaseKeeper:
    """Renews, every third of the lease length, the leases of the pipelines it holds, each by the
    token it was claimed with.

    A renewal that fails means the lease was lost (it expired and another worker claimed the
    pipeline): it is logged, and that pipeline's next write is refused by compare-and-set. A
    pipeline whose hook has run past its time limit is renewed no more, so that another worker
    can take it over when this one is stuck.
    """

    def __init__(self, store: Store, lease_seconds: float, clock: Clock) -> None:
        self.store = store
        self.lease_seconds = lease_seconds
        self.clock = clock
        self._held: dict[str, str] = {}  # pipeline uuid -> lease token
        self._limits: dict[str, datetime] = {}  # pipeline uuid -> renew no later than this
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LeaseKeeper:
        if self.store.can_claim:
            self._thread = threading.Thread(target=self._loop, name="prorch-lease-keeper", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def hold(self, records: Iterable[PipelineRecord]) -> None:
        with self._lock:
            self._held.update((r.uuid, r.lease_owner) for r in records if r.lease_owner is not None)

    def drop(self, uuid: str) -> None:
        with self._lock:
            self._held.pop(uuid, None)
            self._limits.pop(uuid, None)

    def limit(self, uuid: str, until: datetime | None) -> None:
        """Renew the lease of ``uuid`` only while the clock is before ``until`` (None: always)."""
        with self._lock:
            if until is None:
                self._limits.pop(uuid, None)
            else:
                self._limits[uuid] = until

    def renew_all(self) -> None:
        now = self.clock.now()
        with self._lock:
            held = [(uuid, token) for uuid, token in self._held.items() if self._limits.get(uuid, now) >= now]
        until = now + timedelta(seconds=self.lease_seconds)
        for uuid, token in held:
            try:
                if not self.store.renew_lease(uuid, token, until):
                    logger.warning("lease of pipeline %s was lost", uuid, extra={"pipeline_uuid": uuid})
                    self.drop(uuid)
            except Exception as exc:  # the store is down: the lease may lapse; the CAS still guards
                logger.warning("could not renew the lease of pipeline %s: %s", uuid, exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            self.renew_all()
