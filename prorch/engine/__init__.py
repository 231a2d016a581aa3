"""The engine: advancing one pipeline (``Runner``), in parts. ``transitions`` is the state
machine as pure functions, ``journal`` loads runs and commits transitions, ``hookcalls`` calls one
hook within its bound, ``turns`` runs a step's hooks and records their results, ``endings``
handles rollback, cancel and quarantine, ``runtime`` is what a hook reaches beyond its step, and
``rounds`` stores the transitions the runner yields: one per commit, or in groups."""

from prorch.engine.rounds import write_each, write_in_rounds
from prorch.engine.runner import DEFAULT_LEASE_SECONDS, DEFAULT_MAX_CRASHES, DEFAULT_MAX_TURNS_PER_PASS, Runner
from prorch.engine.state import Outcome, Run, Writing
from prorch.engine.turns import STORE_ATTEMPTS

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "DEFAULT_MAX_CRASHES",
    "DEFAULT_MAX_TURNS_PER_PASS",
    "STORE_ATTEMPTS",
    "Outcome",
    "Run",
    "Runner",
    "Writing",
    "write_each",
    "write_in_rounds",
]
