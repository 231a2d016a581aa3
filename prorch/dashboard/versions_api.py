"""The dashboard's Versions page and ``/api/versions``: what ``prorch versions`` prints, per
pipeline class and version the live and ended pipelines and per patch the live ones with it or
predating it, and the code that can be deleted."""

from __future__ import annotations

from typing import Any

from prorch.display import app_loaded
from prorch.orchestrator import Orchestrator
from prorch.storage.versions import advice


def versions_view(orchestrator: Orchestrator) -> dict[str, Any]:
    """``prorch versions --json``: per pipeline class and version, live and ended counts and
    patches (``Orchestrator.versions``); what the workers' code declares only when it is loaded here."""
    return {"versions": versions_page(orchestrator)["versions"]}


def versions_page(orchestrator: Orchestrator) -> dict[str, Any]:
    """``versions_view`` with the lines ``prorch versions`` prints under its table (``advice``),
    and whether the code is loaded here (without it, the page cannot say what it declares)."""
    loaded = app_loaded(orchestrator.registry)
    found = orchestrator.versions(workers_code=loaded)
    return {
        "versions": [usage.to_json() for usage in found],
        "advice": [line for usage in found for line in advice(usage)],
        "code_loaded": loaded,
    }
