"""Keeping leases alive while hooks run, so a long hook does not let another worker take over."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import timedelta
from types import TracebackType

from prorch.clock import Clock
from prorch.store import Store

logger = logging.getLogger("prorch.leases")


class LeaseKeeper:
    """Renews, every third of the lease length, the leases of the pipelines it holds.

    A renewal that fails means the lease was lost (it expired and another worker claimed the
    pipeline): it is logged, and that pipeline's next write is refused by compare-and-set.
    """

    def __init__(self, store: Store, owner: str, lease_seconds: float, clock: Clock) -> None:
        self.store = store
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.clock = clock
        self._held: set[str] = set()
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

    def hold(self, uuids: Iterable[str]) -> None:
        with self._lock:
            self._held.update(uuids)

    def drop(self, uuid: str) -> None:
        with self._lock:
            self._held.discard(uuid)

    def renew_all(self) -> None:
        with self._lock:
            held = list(self._held)
        until = self.clock.now() + timedelta(seconds=self.lease_seconds)
        for uuid in held:
            try:
                if not self.store.renew_lease(uuid, self.owner, until):
                    logger.warning("lease of pipeline %s was lost", uuid, extra={"pipeline_uuid": uuid})
                    self.drop(uuid)
            except Exception as exc:  # the store is down: the lease may lapse; the CAS still guards
                logger.warning("could not renew the lease of pipeline %s: %s", uuid, exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            self.renew_all()
