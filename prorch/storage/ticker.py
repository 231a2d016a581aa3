"""A call repeated every few seconds on a daemon thread until stopped: the loop of a worker's
heartbeat and of its lease keeper, kept in one place so that both start, wake and stop alike."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Ticker:
    """Calls ``tick`` every ``every`` seconds on daemon thread ``name``, from ``start`` until
    ``stop``, which waits for a call under way to end. With ``on_error``, an exception from
    ``tick`` is handed to it and the loop goes on; without, it ends the thread (``ended``)."""

    def __init__(
        self, name: str, every: float, tick: Callable[[], object], on_error: Callable[[Exception], None] | None = None
    ) -> None:
        self.name = name
        self.every = every
        self.tick = tick
        self.on_error = on_error
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop for good (a stopped ticker does not start again), and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def ended(self) -> bool:
        """True when the thread was started and is no more (stopped, or ``tick`` raised)."""
        return self._thread is not None and not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            if self.on_error is None:
                self.tick()
                continue
            try:
                self.tick()
            except Exception as exc:  # the caller's choice: log it and try again at the next turn
                self.on_error(exc)
