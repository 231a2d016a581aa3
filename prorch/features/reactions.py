"""Reactions as an extension: the registry's book of reactions (``prorch.reactions``), installed
on the orchestrator's registry so that this worker runs the reaction tasks stored by any
process; the book adds each transition's reaction tasks to its commit."""

from __future__ import annotations

from prorch import reactions
from prorch.extension import Extension, Host


def reactions_for(host: Host) -> Extension:
    """The built-in's factory: the host's registry's book, installed once (the same object
    goes with the registry into pipeline creation)."""
    return reactions.install(host.registry)
