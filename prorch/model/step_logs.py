"""Step logs: what a hook logs through ``self.log`` (and, with the ``capture_logging`` setting,
the standard ``logging`` records emitted in the hook's thread or task while it runs), kept with
the step attempt it was logged in and stored with the transition that records the hook's
outcome, all or nothing with it.

A step's ``logs`` field holds them attempt by attempt, oldest first: ``[{"attempt": 1, "lines":
[[at, level, message], ...], "dropped": 0}, {"attempt": 2, ...}]``. An attempt keeps its first
``step_log_lines`` lines; the others are counted in ``dropped`` (shown as "N lines dropped"),
so a hook logging in a loop cannot grow a record without bound. An operator's retry starts the
attempts again from 1: it marks the last entry ``retried``, so that the new attempt 1 gets an
entry of its own.

The lines of a step's other hooks (``on_rollback``, ``on_cancel``, ``on_timeout``) are kept the
same way, in entries of their own that name the hook: ``{"attempt": 1, "hook": "on_rollback",
...}`` (a rollback's attempt is its own count of tries, the others the step's attempt)."""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from prorch.model.records import JSONDict

MAX_LINE = 2000
"""Characters of one stored line at most (the rest is cut, marked ``[...]``)."""
MARK = "prorch_step_log"
"""Set on the records ``self.log`` forwards to ``logging``: the capture does not store them twice."""


class LogBuffer:
    """The lines of one hook call, at most ``cap``; the others counted."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.lines: list[list[str]] = []
        self.dropped = 0

    def add(self, level: str, message: str, at: datetime | None = None) -> None:
        if len(self.lines) >= self.cap:
            self.dropped += 1
            return
        if len(message) > MAX_LINE:
            message = message[:MAX_LINE] + " [...]"
        moment = at or datetime.now(timezone.utc)
        self.lines.append([moment.isoformat(timespec="milliseconds"), level, message.replace("\x00", "\\x00")])

    def __bool__(self) -> bool:
        return bool(self.lines or self.dropped)


class StepLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """``self.log``: a ``logging.LoggerAdapter`` whose lines are also kept with the step
    attempt. Every level is kept, whatever the logger's level; the line still goes to
    ``logging`` (logger ``prorch.steps.NAME``) as ``self.logger``'s do."""

    def __init__(self, logger: logging.Logger, extra: dict[str, Any], buffer: LogBuffer) -> None:
        super().__init__(logger, {**extra, MARK: True})
        self.buffer = buffer

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        try:
            text = str(msg) % args if args else str(msg)
        except (TypeError, ValueError):  # a format that does not match its arguments
            text = f"{msg} {args!r}"
        error = _exception(kwargs.get("exc_info"))
        if error is not None:
            text += f" ({type(error).__name__}: {error}; its traceback is in the worker's log)"
        self.buffer.add(logging.getLevelName(level), text)
        super().log(level, msg, *args, **kwargs)


def _exception(exc_info: Any) -> BaseException | None:
    """The exception ``exc_info`` names (``logging``'s forms: True, an exception, a tuple)."""
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3 and isinstance(exc_info[1], BaseException):
        return exc_info[1]
    return sys.exc_info()[1] if exc_info else None


_CAPTURING: contextvars.ContextVar[LogBuffer | None] = contextvars.ContextVar("prorch_step_log", default=None)


class CaptureHandler(logging.Handler):
    """On the root logger while ``capture_logging`` is on: a record emitted where a hook runs
    (its thread, or its task for an ``async def`` hook) goes to that hook's lines too."""

    def emit(self, record: logging.LogRecord) -> None:
        buffer = _CAPTURING.get()
        if buffer is None or getattr(record, MARK, False):
            return
        try:
            text = record.getMessage()
        except Exception:  # a bad format: logging reports it through its own handlers
            return
        buffer.add(record.levelname, f"{record.name}: {text}", datetime.fromtimestamp(record.created, timezone.utc))


_HANDLER = CaptureHandler()


def install_capture() -> None:
    """Add the capture's handler to the root logger, once per process."""
    root = logging.getLogger()
    if _HANDLER not in root.handlers:
        root.addHandler(_HANDLER)


def capturing(hook: Callable[[], object], buffer: LogBuffer) -> Callable[[], object]:
    """``hook``, with ``logging``'s records emitted while it runs (in its thread or task) kept in
    ``buffer``; an ``async def`` hook stays one."""
    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def run_async() -> object:
            token = _CAPTURING.set(buffer)
            try:
                return await hook()
            finally:
                _CAPTURING.reset(token)

        return run_async

    @functools.wraps(hook)
    def run() -> object:
        token = _CAPTURING.set(buffer)
        try:
            return hook()
        finally:
            _CAPTURING.reset(token)

    return run


def merged(
    stored: list[JSONDict] | None, attempt: int, buffer: LogBuffer, cap: int, hook: str | None = None
) -> list[JSONDict]:
    """A step's logs with ``buffer``'s lines added to attempt ``attempt`` (of ``hook``, None for
    ``on_start`` and ``on_continue``): to its entry when it is the last one (and no retry closed
    it), else to a new one; at most ``cap`` lines an attempt, the rest counted as dropped."""
    entries = [dict(entry) for entry in stored or []]
    last = entries[-1] if entries else {}
    if not entries or last.get("attempt") != attempt or last.get("hook") != hook or last.get("retried"):
        entries.append({"attempt": attempt, "lines": [], "dropped": 0, **({"hook": hook} if hook else {})})
    entry = entries[-1]
    lines = list(entry.get("lines") or [])
    room = max(cap - len(lines), 0)
    entry["dropped"] = int(entry.get("dropped") or 0) + buffer.dropped + max(len(buffer.lines) - room, 0)
    entry["lines"] = lines + buffer.lines[:room]
    return entries


def since(buffer: LogBuffer, lines: int, dropped: int) -> LogBuffer:
    """What ``buffer`` got after it held ``lines`` lines and ``dropped`` dropped ones: the lines
    of a later hook called on the same step object (``on_cancel`` after ``cancel()``)."""
    later = LogBuffer(buffer.cap)
    later.lines, later.dropped = buffer.lines[lines:], buffer.dropped - dropped
    return later


def closed(stored: list[JSONDict] | None) -> list[JSONDict] | None:
    """The logs of a step an operator retries: its last entry marked ``retried``."""
    if not stored:
        return stored
    return [*stored[:-1], {**stored[-1], "retried": True}]
