"""The built-in features, each an ``Extension`` (``prorch.engine.extension``) that every orchestrator
takes by default where it applies, in this order: schedules, limits, reactions, children,
retention (with the ``retention`` setting), tracing (with an OpenTelemetry SDK configured).
Importing this package registers them (``prorch`` does it); the orchestrator names none."""

from __future__ import annotations

from prorch.engine.extension import Extension, Host, register_builtin
from prorch.features.children import Children
from prorch.features.limits import Limits
from prorch.features.reactions import reactions_for
from prorch.features.retention import Retention
from prorch.features.schedules import Schedules
from prorch.features.tracing import Tracing

__all__ = ["Children", "Limits", "Retention", "Schedules", "Tracing", "reactions_for"]


def _schedules(host: Host) -> Extension:
    return Schedules()


def _limits(host: Host) -> Extension:
    return Limits()


def _children(host: Host) -> Extension:
    return Children()


for _factory in (_schedules, _limits, reactions_for, _children, Retention.if_set, Tracing.if_configured):
    register_builtin(_factory)
