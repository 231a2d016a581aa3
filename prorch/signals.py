"""A worker's SIGTERM and SIGINT: the first stops it cleanly (running hooks finish, leases are
released), within a grace period; a second one, or the end of the grace, exits at once."""

from __future__ import annotations

import _thread
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

EXIT_FORCED = 1
"""Exit status of a worker that stopped without waiting for its hooks (a second signal, or the grace ran out)."""


def stop_on_signals(stop: Callable[[], None], stopping: Callable[[], bool], grace: float) -> Callable[[], None]:
    """Call ``stop`` on the first SIGTERM or SIGINT; returns what puts the previous handlers
    back. Outside the main thread (where Python cannot take signals) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    received: list[str] = []  # appended to in the handler itself: no lock taken there

    def handle(signum: int, frame: Any) -> None:
        """Runs between two bytecodes of the main thread, which may hold a lock that stopping
        takes (an ``Event``'s, mid-``wait``; the logging handler's): so it only notes the signal
        and hands the rest to a new thread, started without any lock of ``threading``'s."""
        name = signal.Signals(signum).name
        if received or stopping():
            _thread.start_new_thread(_exit_now, (name,))
            return
        received.append(name)
        _thread.start_new_thread(_begin_stop, (name,))

    def _begin_stop(name: str) -> None:
        logger.info(
            "received %s: letting running hooks finish (up to %gs), releasing leases, then exiting", name, grace
        )
        stop()
        timer = threading.Timer(grace, grace_over, args=(grace,))
        timer.daemon = True
        timer.start()

    for sig in previous:
        signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _exit_now(name: str) -> None:
    logger.warning("received %s again: exiting now (leases expire by themselves)", name)
    logging.shutdown()
    os._exit(EXIT_FORCED)


def grace_over(grace: float) -> None:
    """Hooks still run after the shutdown grace: exit anyway, non-zero (their leases expire and
    their pipelines are charged as crashed; the others were released or expire)."""
    logger.error("hooks still running %gs after the stop signal: exiting without them", grace)
    logging.shutdown()
    os._exit(EXIT_FORCED)
