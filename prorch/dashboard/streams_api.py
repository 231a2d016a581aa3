"""``GET /api/pipelines/{uuid}/stream``: a pipeline's stream (``self.emit``) as server-sent
events, one event per entry with the entry's cursor as its ``id``, so that a browser's
``EventSource`` resumes after the last entry it saw (``Last-Event-ID``) when it reconnects; or
``?after=N``. The response ends with an ``end`` event once the pipeline has ended and its last
entries are sent (a client closes its ``EventSource`` on it, which would otherwise reconnect).

Each read of the store runs off the event loop (``off_loop``); between reads the loop only
sleeps, so a waiting client holds no thread."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from prorch.model.exceptions import PipelineNotFoundError, RepositoryError
from prorch.model.records import StreamRecord
from prorch.model.status import TERMINAL
from prorch.orchestrator import Orchestrator

POLL_SECONDS = 0.5
"""Longest sleep between two reads of a stream that has nothing new."""
KEEP_ALIVE_SECONDS = 15.0
"""A comment line at least this often, so that proxies keep an idle stream open."""
OUTAGE_FIRST_SECONDS = 0.1
OUTAGE_MAX_SECONDS = 5.0
"""While the store fails, the stream reads it again after 0.1 s, doubling up to this."""


def route(orchestrator: Orchestrator, off_loop: Callable[..., Any]) -> Route:
    """The endpoint's route, for the dashboard's route list."""

    async def endpoint(request: Request) -> Response:
        uuid = request.path_params["uuid"]
        try:
            after = cursor_of(request)
            await off_loop(orchestrator.get, uuid)
        except PipelineNotFoundError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        except RepositoryError as exc:  # nothing sent yet: say so, and when to try again
            message = f"the store is unavailable: {exc}; try again later"
            return JSONResponse({"error": message}, status_code=503, headers={"Retry-After": "5"})
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            events(orchestrator, off_loop, uuid, after), media_type="text/event-stream", headers=headers
        )

    return Route("/api/pipelines/{uuid}/stream", endpoint)


def cursor_of(request: Request) -> int:
    """``?after=N``, else the ``Last-Event-ID`` header of a reconnecting client, else 0."""
    text = request.query_params.get("after") or request.headers.get("last-event-id") or "0"
    try:
        cursor = int(text)
    except ValueError:
        raise ValueError(
            f"after={text!r} is not a cursor: give the seq of the last entry read (an integer >= 0)"
        ) from None
    if cursor < 0:
        raise ValueError(f"after={cursor} is not a cursor: give the seq of the last entry read (an integer >= 0)")
    return cursor


async def events(orchestrator: Orchestrator, off_loop: Callable[..., Any], uuid: str, after: int) -> AsyncIterator[str]:
    """The entries after ``after`` as they are stored, then ``end`` once the pipeline has ended.
    While the store fails (down, locked), the stream stays open: a comment says so, and the next
    read, after a backoff, goes on from the same cursor (nothing skipped, nothing sent twice)."""
    cursor, delay, quiet, backoff = after, 0.05, 0.0, OUTAGE_FIRST_SECONDS
    while True:
        try:
            page, ended = await off_loop(_next, orchestrator, uuid, cursor)
        except RepositoryError:
            yield ": the store is unavailable: trying again\n\n"
            await asyncio.sleep(backoff)
            backoff, quiet = min(backoff * 2, OUTAGE_MAX_SECONDS), 0.0
            continue
        backoff = OUTAGE_FIRST_SECONDS
        for entry in page:
            yield entry_event(entry)
        if ended is not None:
            yield f"event: end\ndata: {json.dumps({'status': ended})}\n\n"
            return
        if page:
            cursor, delay, quiet = page[-1].seq, 0.05, 0.0
            continue
        if quiet >= KEEP_ALIVE_SECONDS:
            yield ": keep-alive\n\n"
            quiet = 0.0
        await asyncio.sleep(delay)
        quiet += delay
        delay = min(delay * 2, POLL_SECONDS)


def _next(orchestrator: Orchestrator, uuid: str, cursor: int) -> tuple[list[StreamRecord], str | None]:
    """The entries after ``cursor``, and the pipeline's final status ("purged" once it is gone)
    if it has ended, with every entry of its last transition; None while it runs."""
    page = orchestrator.store.stream_entries(uuid, cursor)
    if page:
        return page, None
    record = orchestrator.store.get_pipeline(uuid)
    if record is None or record.status in TERMINAL:
        return _rest(orchestrator, uuid, cursor), record.status.value if record is not None else "purged"
    return [], None


def entry_event(entry: StreamRecord) -> str:
    data = {"seq": entry.seq, "at": entry.at.isoformat(timespec="milliseconds"), "value": entry.value}
    return f"id: {entry.seq}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _rest(orchestrator: Orchestrator, uuid: str, cursor: int) -> list[StreamRecord]:
    """Every entry after ``cursor``, page by page (none once the pipeline is purged)."""
    found: list[StreamRecord] = []
    while page := orchestrator.store.stream_entries(uuid, cursor):
        found += page
        cursor = page[-1].seq
    return found
