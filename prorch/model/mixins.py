"""The hook mixins of prorch 1.0.1: a step declares which hooks it has by mixing them in."""

from __future__ import annotations

from collections.abc import Awaitable

HookResult = Awaitable[None] | None
"""What a hook returns: nothing, or, for an ``async def`` hook, what the worker awaits."""


class OnStartMixin:
    """Gives a step an ``on_start`` hook: run once when the step becomes current (at least once
    across crashes; ``self.idempotency_key`` is stable across re-runs)."""

    def on_start(self) -> HookResult:
        raise NotImplementedError(f"{type(self).__name__} mixes in OnStartMixin but defines no on_start()")


class OnContinueMixin:
    """Gives a step an ``on_continue`` hook: run right after ``on_start`` and on every resume until
    the step calls ``finish``, ``fail`` or ``cancel``. Returning without one keeps it pending."""

    def on_continue(self) -> HookResult:
        raise NotImplementedError(f"{type(self).__name__} mixes in OnContinueMixin but defines no on_continue()")


def defines_hook(cls: type, hook: str) -> bool:
    """True when ``cls`` has a real ``hook`` of its own (not the mixin's placeholder)."""
    for klass in cls.__mro__:
        if hook in vars(klass):
            return klass not in (OnStartMixin, OnContinueMixin)
    return False
