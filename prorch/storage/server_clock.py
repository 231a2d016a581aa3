"""A store's clock: where the database has one that every worker shares (PostgreSQL), this
machine's clock aligned to it, so that workers on several machines agree on what is due."""

from __future__ import annotations

import contextlib
import logging
import weakref
from datetime import datetime

from prorch.model.clock import Clock, ServerAlignedClock, SystemClock
from prorch.model.exceptions import RepositoryError
from prorch.storage.backend import Backend
from prorch.storage.commits import call

__all__ = ["ServerClock"]

logger = logging.getLogger("prorch.storage.server_clock")

_ALIGNED: weakref.WeakKeyDictionary[object, ServerAlignedClock] = weakref.WeakKeyDictionary()
"""The aligned clock of each backend object: every store this process makes over one backend
(a ``create()``, an ``Orchestrator``, a CLI command) reads one estimate of the server's time.
Two estimates differ by up to half a round trip each, so a pipeline created by one store at its
"now" was not yet due at another store's "now" a few milliseconds later."""


class ServerClock:
    """The clock of one backend; the aligned clock is made once."""

    def __init__(self, engine: Backend, backend: object) -> None:
        self.engine = engine
        self.backend = backend
        self._aligned_clock: ServerAlignedClock | None = None

    def clock(self, clock: Clock | None = None) -> Clock:
        """The clock given; else, on a store with a server clock (PostgreSQL), the system clock
        aligned to the server's; else the system clock. A test clock is used as it is."""
        if clock is not None and not isinstance(clock, SystemClock):
            return clock
        if clock is None:
            self._aligned_clock = self._aligned_clock or _shared(self.backend)
            if self._aligned_clock is not None:
                return self._aligned_clock
        try:
            probe = call("read the server's clock", self.engine.server_time)
        except RepositoryError as exc:
            probe = None
            logger.warning("could not read the clock of %r (%s); using this machine's", self.backend, exc)
        if probe is None:
            return clock or SystemClock()
        aligned = ServerAlignedClock(self._server_now, clock)
        if clock is None:
            self._aligned_clock = aligned
            _share(self.backend, aligned)
        return aligned

    def _server_now(self) -> datetime:
        found = call("read the server's clock", self.engine.server_time)
        if found is None:  # pragma: no cover - it answered when the clock was made
            raise RepositoryError(f"{self.backend!r} no longer reports its clock")
        return found


def _shared(backend: object) -> ServerAlignedClock | None:
    try:
        return _ALIGNED.get(backend)
    except TypeError:  # a backend that cannot be weakly referenced: each store aligns its own
        return None


def _share(backend: object, aligned: ServerAlignedClock) -> None:
    with contextlib.suppress(TypeError):  # not weakly referable: each store aligns its own
        _ALIGNED.setdefault(backend, aligned)
