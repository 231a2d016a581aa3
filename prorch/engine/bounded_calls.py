"""Calling a user's hook, sync or ``async def``, with a bound on its time.

A sync hook with no bound runs in the caller's thread, as cheaply as a function call. A bounded
sync hook runs in a daemon thread of its own; when it overruns, the caller stops waiting, the
thread is abandoned (Python cannot kill a thread) and counted, and ``HookTimeoutError`` is
raised, so a hung hook never holds up the pass, the worker's shutdown, or ``prorch run``.

An ``async def`` hook runs on the caller's event loop: one loop per ``HookCaller`` (so one per
worker), in a daemon thread, living as long as the caller, so that clients a hook caches keep
their loop from one pass to the next. The pass's threads each wait for their own hook, so the
async hooks of up to ``concurrency`` pipelines run concurrently on that one loop. An overrun
cancels the hook's task; a task that ignores the cancellation is abandoned and counted too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from prorch.model.exceptions import HookTimeoutError

logger = logging.getLogger("prorch.engine.bounded_calls")

RECENT_CALLS = 16
"""Hook calls ``HookCaller.recent_slowest`` looks back on."""

CANCEL_GRACE_SECONDS = 1.0
"""How long a cancelled async hook gets to unwind (its ``finally`` blocks) before it is abandoned."""


class _Outcome:
    """What an async hook did, carried back to the waiting thread: ``BaseException`` included,
    which asyncio would otherwise raise out of the loop itself."""

    __slots__ = ("ended", "error")

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.ended = threading.Event()


def _stop_loop(loop: asyncio.AbstractEventLoop) -> None:
    with contextlib.suppress(RuntimeError):  # closed already
        loop.call_soon_threadsafe(loop.stop)


class HookCaller:
    """Runs hook calls, bounded or not, sync or async, and keeps count of the ones it had to
    abandon."""

    def __init__(self) -> None:
        self._abandoned_threads: list[threading.Thread] = []
        self._abandoned_tasks: list[_Outcome] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._loop_pid = 0
        self._in_flight = 0
        self._recent: deque[float] = deque(maxlen=RECENT_CALLS)
        self._slowest = float("inf")  # max(self._recent): kept as each call ends, read far more often

    @property
    def recent_slowest(self) -> float:
        """Seconds the slowest of the last ``RECENT_CALLS`` hook calls took (infinite before
        any): how quick hooks are now, for a worker sizing its claims (read several times a
        turn of its loop: a float kept up to date, no lock; it was 5% of a worker's CPU on W1)."""
        return self._slowest

    @property
    def in_flight(self) -> int:
        """How many hook calls are running now (an abandoned one no longer counts)."""
        return self._in_flight

    # --- calling ----------------------------------------------------------------------------

    def call(self, func: Callable[[], object], bound: float | None, what: str) -> None:
        """Run ``func``; with a ``bound`` (seconds), give up after that long. Whatever ``func``
        raises (``BaseException`` included) is raised here, with its traceback."""
        with self._lock:
            self._in_flight += 1
        started = time.monotonic()
        try:
            self._call(func, bound, what)
        finally:
            took = time.monotonic() - started
            with self._lock:
                self._in_flight -= 1
                self._recent.append(took)
                self._slowest = max(self._recent)

    def _call(self, func: Callable[[], object], bound: float | None, what: str) -> None:
        if inspect.iscoroutinefunction(func):
            self._await(func(), bound, what)
            return
        if bound is None:
            result = func()
            if inspect.isawaitable(result):  # an async hook under a decorator that hides it
                self._await(result, None, what)
            return
        self._call_in_thread(func, bound, what)

    def _call_in_thread(self, func: Callable[[], object], bound: float, what: str) -> None:
        raised: list[BaseException] = []
        submitted: list[concurrent.futures.Future[None]] = []

        def target() -> None:
            try:
                result = func()
                if inspect.isawaitable(result):
                    future = self._submit(result, _Outcome())
                    submitted.append(future)
                    future.result()
            except BaseException as exc:  # handed to the waiting caller
                raised.append(exc)

        thread = threading.Thread(target=target, name=f"prorch-hook {what}", daemon=True)
        thread.start()
        thread.join(max(bound, 0.0))
        if thread.is_alive():
            for future in submitted:
                future.cancel()
            with self._lock:
                self._abandoned_threads.append(thread)
            logger.error("%s did not return within %gs: its thread is abandoned", what, bound)
            raise HookTimeoutError(f"{what} did not return within {bound:g}s; its thread was abandoned")
        if raised:
            raise raised[0]

    def _await(self, awaitable: Awaitable[Any], bound: float | None, what: str) -> None:
        """Run an async hook on the loop and wait for it here; cancel it when it overruns."""
        outcome = _Outcome()
        future = self._submit(awaitable, outcome)
        try:
            future.result(timeout=None if bound is None else max(bound, 0.0))
        except concurrent.futures.TimeoutError:
            future.cancel()
            if not outcome.ended.wait(CANCEL_GRACE_SECONDS):
                with self._lock:
                    self._abandoned_tasks.append(outcome)
                logger.error("%s did not return within %gs and ignored its cancellation: abandoned", what, bound)
                raise HookTimeoutError(
                    f"{what} did not return within {bound:g}s and ignored its cancellation; it was abandoned"
                ) from None
            logger.error("%s did not return within %gs: cancelled", what, bound)
            raise HookTimeoutError(f"{what} did not return within {bound:g}s; it was cancelled") from None
        except concurrent.futures.CancelledError:  # cancelled from elsewhere: the loop closed under it
            raise HookTimeoutError(f"{what} was cancelled: its event loop stopped") from None
        except BaseException:  # KeyboardInterrupt while waiting: the hook must not run on alone
            future.cancel()
            raise
        if outcome.error is not None:
            raise outcome.error

    def _submit(self, awaitable: Awaitable[Any], outcome: _Outcome) -> concurrent.futures.Future[None]:
        async def guarded() -> None:
            try:
                await awaitable
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # re-raised in the waiting thread
                outcome.error = exc
            finally:
                outcome.ended.set()

        return asyncio.run_coroutine_threadsafe(guarded(), self.loop())

    # --- the event loop -----------------------------------------------------------------------

    def loop(self) -> asyncio.AbstractEventLoop:
        """This caller's event loop, started on first use (and again in a forked child, which
        inherits the loop object but not its thread)."""
        with self._lock:
            if self._loop is None or self._loop_pid != os.getpid() or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="prorch-event-loop", daemon=True)
                thread.start()
                self._loop, self._loop_thread, self._loop_pid = loop, thread, os.getpid()
                weakref.finalize(self, _stop_loop, loop)  # a caller dropped without close() frees its thread
            return self._loop

    def close(self) -> None:
        """Stop the event loop, cancelling what still runs on it. Calls after this start a new one."""
        with self._lock:
            loop, thread = self._loop, self._loop_thread
            self._loop = self._loop_thread = None
        if loop is None or thread is None or self._loop_pid != os.getpid():
            return

        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=CANCEL_GRACE_SECONDS)
            await loop.shutdown_asyncgens()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(CANCEL_GRACE_SECONDS * 2)
        except (concurrent.futures.TimeoutError, RuntimeError):
            logger.warning("the hooks' event loop did not shut down cleanly")
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CANCEL_GRACE_SECONDS)
        if not thread.is_alive():
            loop.close()

    # --- health -----------------------------------------------------------------------------

    @property
    def abandoned(self) -> int:
        """How many abandoned hooks (threads, or async tasks that ignored their cancellation)
        are still running."""
        with self._lock:
            self._abandoned_threads = [thread for thread in self._abandoned_threads if thread.is_alive()]
            self._abandoned_tasks = [task for task in self._abandoned_tasks if not task.ended.is_set()]
            return len(self._abandoned_threads) + len(self._abandoned_tasks)
