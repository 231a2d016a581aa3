"""``/api/versions`` for the dashboard: the JSON of ``prorch versions --json``. Kept in its own
module so that the dashboard's app can mount it in one line (not mounted yet, nor the page):
``Route("/api/versions", versions_endpoint(orchestrator))``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from prorch.display import app_loaded
from prorch.orchestrator import Orchestrator


def versions_view(orchestrator: Orchestrator) -> dict[str, Any]:
    """Per pipeline class and version, live and ended counts and patches (``Orchestrator.versions``);
    what the workers' code declares only when it is loaded here."""
    found = orchestrator.versions(workers_code=app_loaded(orchestrator.registry))
    return {"versions": [usage.to_json() for usage in found]}


def versions_endpoint(orchestrator: Orchestrator) -> Callable[[Any], Awaitable[Any]]:
    """A Starlette endpoint returning ``versions_view`` as JSON, counted off the event loop."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    async def endpoint(request: Any) -> Any:
        return JSONResponse(await run_in_threadpool(versions_view, orchestrator))

    return endpoint
