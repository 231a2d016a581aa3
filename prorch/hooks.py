"""Calling a user's hook with a bound on its time.

A hook with no bound runs in the caller's thread, as cheaply as a function call. A bounded hook
runs in a daemon thread of its own; when it overruns, the caller stops waiting, the thread is
abandoned (Python cannot kill a thread) and counted, and ``HookTimeoutError`` is raised, so a
hung hook never holds up the pass, the worker's shutdown, or ``prorch run``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from prorch.exceptions import HookTimeoutError

logger = logging.getLogger("prorch.hooks")


class HookCaller:
    """Runs hook calls, bounded or not, and keeps the threads of the ones it had to abandon."""

    def __init__(self) -> None:
        self._abandoned: list[threading.Thread] = []
        self._lock = threading.Lock()

    def call(self, func: Callable[[], object], bound: float | None, what: str) -> None:
        """Run ``func``; with a ``bound`` (seconds), give up after that long. Whatever ``func``
        raises (``BaseException`` included) is raised here, with its traceback."""
        if bound is None:
            func()
            return
        raised: list[BaseException] = []

        def target() -> None:
            try:
                func()
            except BaseException as exc:  # handed to the waiting caller
                raised.append(exc)

        thread = threading.Thread(target=target, name=f"prorch-hook {what}", daemon=True)
        thread.start()
        thread.join(max(bound, 0.0))
        if thread.is_alive():
            with self._lock:
                self._abandoned.append(thread)
            logger.error("%s did not return within %gs: its thread is abandoned", what, bound)
            raise HookTimeoutError(f"{what} did not return within {bound:g}s; its thread was abandoned")
        if raised:
            raise raised[0]

    @property
    def abandoned(self) -> int:
        """How many abandoned hook threads are still running."""
        with self._lock:
            self._abandoned = [thread for thread in self._abandoned if thread.is_alive()]
            return len(self._abandoned)
