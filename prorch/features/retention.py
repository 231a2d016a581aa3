"""Retention as an extension: a worker (``run_forever``) with ``retention`` purges the pipelines
that ended longer ago than that (``prorch.storage.purge.purge``) every ``PURGE_EVERY_SECONDS``, the
first time at its first pass, in a thread of its own where the store allows it, so that the
loop (and its health check) goes on while a large purge runs; a failure is logged."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import timedelta

from prorch.engine.extension import Extension, Host, PassReport
from prorch.model.exceptions import ConfigurationError, RepositoryError
from prorch.storage import purge

logger = logging.getLogger("prorch.features.retention")

PURGE_EVERY_SECONDS = 600.0
"""How often a worker with `retention` purges (the first time at its first pass)."""


class Retention(Extension):
    """The worker's periodic purge of what ended longer ago than ``older_than``."""

    def __init__(self, older_than: timedelta) -> None:
        self.older_than = older_than
        self._running = False
        self._last_purge = 0.0
        self._purging: threading.Thread | None = None

    @classmethod
    def if_set(cls, host: Host) -> Retention | None:
        """The built-in's factory: an instance when the host has a ``retention`` setting."""
        return cls(host.retention) if host.retention is not None else None

    def setup(self, host: Host) -> None:
        self.host = host

    def start(self) -> None:
        self._running = True

    def stop(self) -> None:
        """Told to stop by the host's stop signal, the purge ends its batch and logs what it did."""
        self._running = False
        if self._purging is not None:
            self._purging.join(self.host.shutdown_grace)

    def on_pass_end(self, summary: PassReport, lags: Sequence[float], seconds: float) -> None:
        if not self._running or time.monotonic() - self._last_purge < PURGE_EVERY_SECONDS:
            return
        if self._purging is not None and self._purging.is_alive():
            return  # the last one is still going
        self._last_purge = time.monotonic()
        if not self.host.store.thread_safe:
            self._purge_logged(self.older_than)
            return
        self._purging = threading.Thread(
            target=self._purge_logged, args=(self.older_than,), name="prorch-retention", daemon=True
        )
        self._purging.start()

    def _purge_logged(self, older_than: timedelta) -> None:
        try:
            purge.purge(self.host.store, self.host.clock, older_than, stop=self.host.stopped)
        except (RepositoryError, ConfigurationError) as exc:
            logger.error("retention: purge failed, trying again in %.0fs: %s", PURGE_EVERY_SECONDS, exc)
