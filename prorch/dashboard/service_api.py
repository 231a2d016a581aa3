"""The HTTP API for other services, under ``/api/v1/`` of the dashboard's app: start a pipeline
by name, send it a message, read it, wait for its result (long poll), cancel, retry, list, and
an OpenAPI document of it all. A Go or Node service uses it without Python (docs/api.md).

It lives in the dashboard's Starlette app so that one server, one thread pool for the
synchronous store (``off_loop``) and one ``Orchestrator`` serve both; its tokens are its own
(``api_tokens``, with scopes and names), not the dashboard's single token. Every refusal is
``{"error": {"type", "message"}}`` with the message the CLI prints, and is made before anything
is stored."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from prorch.config import ApiToken
from prorch.dashboard import streams_api, views
from prorch.dashboard.security import Throttle
from prorch.dashboard.service_auth import ApiAuthError, Caller, Tokens
from prorch.dashboard.service_doc import openapi
from prorch.model.exceptions import (
    ConcurrentUpdateError,
    CorruptRecordError,
    CorruptStoreError,
    InvalidMessageError,
    InvalidParamsError,
    InvalidStateError,
    KeyConflictError,
    NotRegisteredError,
    PipelineFailedError,
    PipelineNotFoundError,
    ProrchError,
    RepositoryError,
)
from prorch.model.records import PipelineRecord
from prorch.model.status import TERMINAL
from prorch.orchestrator import Orchestrator
from prorch.pipeline import pipeline_class
from prorch.storage.listing import parse_age
from prorch.storage.outside import NO_PAYLOAD

logger = logging.getLogger(__name__)
MAX_WAIT = 60.0
"""Seconds a long poll on ``/result`` waits at most (``timeout`` is capped to it)."""
POLL = 1.0
"""Seconds between a long poll's reads of the pipeline, at most (it starts at 50 ms and doubles)."""
FAILED_TOKEN_DELAY = 0.5
STORE_RETRY_AFTER = 5
"""Seconds a 503 (the store failed) asks a client to wait before trying again."""
START_FIELDS = ("params", "version", "key", "tenant", "priority", "attributes", "if_running", "debounce")
OffLoop = Callable[..., Awaitable[Any]]
Handler = Callable[[Request, Caller], Awaitable[Response]]


def routes(orchestrator: Orchestrator, api_tokens: Mapping[str, ApiToken], off_loop: OffLoop) -> list[Route]:
    """The ``/api/v1`` routes (mount them there) over ``orchestrator``'s store."""
    tokens, throttle = Tokens(api_tokens), Throttle()

    def guarded(scope: str | None, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            client = request.client.host if request.client else "unknown"
            wait = throttle.retry_after(client)
            if wait is not None:
                response = refusal(ApiAuthError(f"too many wrong tokens from your address: try again in {wait}s", 429))
                response.headers["Retry-After"] = str(wait)
                return response
            try:
                caller = tokens.caller(request.headers.get("authorization"))
            except ApiAuthError as exc:
                if request.headers.get("authorization") is not None and tokens.tokens:  # a wrong one
                    throttle.failed(client)
                    await asyncio.sleep(FAILED_TOKEN_DELAY)
                logger.warning("api: refused %s %s from %s (%s)", request.method, request.url.path, client, exc)
                return refusal(exc)
            try:
                if scope is not None:
                    caller.require(scope)
                return await handler(request, caller)
            except ProrchError as exc:
                logger.info("api: %s %s by %s refused: %s", request.method, request.url.path, caller.label, exc)
                return refusal(exc)

        return endpoint

    async def record_for(caller: Caller, uuid: str) -> PipelineRecord:
        """The pipeline, if the caller may touch its name (404 before 403: a uuid is no secret name)."""
        record: PipelineRecord | None = await off_loop(orchestrator.store.get_pipeline, uuid)
        if record is None:
            raise PipelineNotFoundError(f"no pipeline with uuid {uuid} is stored", uuid=uuid)
        caller.require_name(record.name)
        return record

    async def start(request: Request, caller: Caller) -> Response:
        name = request.path_params["name"]
        caller.require_name(name)
        body = await json_object(request, '{"params": {...}, "key": "order-1"}', empty_ok=True)
        options = start_options(body)
        created = await off_loop(_create, orchestrator, name, options)
        logger.info("api: started %s %s by %s (created: %s)", name, created.uuid, caller.label, created.created)
        return JSONResponse({**created.record.to_dict(), "created": created.created},
                            status_code=201 if created.created else 200)  # fmt: skip

    async def get(request: Request, caller: Caller) -> Response:
        uuid = request.path_params["uuid"]
        await record_for(caller, uuid)
        state = await off_loop(orchestrator.get, uuid)
        return JSONResponse({**state.pipeline.to_dict(), "steps": [step.to_dict() for step in state.steps],
                             "blocked": state.blocked})  # fmt: skip

    async def result(request: Request, caller: Caller) -> Response:
        uuid = request.path_params["uuid"]
        timeout = wait_seconds(request.query_params.get("timeout"))
        deadline = time.monotonic() + timeout
        record, delay = await record_for(caller, uuid), 0.05
        while record.status not in TERMINAL and time.monotonic() < deadline:
            await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0)))  # no thread held meanwhile
            record, delay = await record_for(caller, uuid), min(delay * 2, POLL)
        if record.status not in TERMINAL:
            message = f"pipeline {uuid} did not end within {timeout:g}s (it is {record.status.value}): ask again"
            return JSONResponse({"uuid": uuid, "status": record.status.value, "message": message},
                                status_code=202, headers={"Retry-After": "1"})  # fmt: skip
        try:
            value = await off_loop(orchestrator.result, uuid)
        except PipelineFailedError as exc:
            error = {"type": type(exc).__name__, "message": str(exc), "detail": exc.error}
            return JSONResponse({"uuid": uuid, "status": exc.status, "error": error})
        return JSONResponse({"uuid": uuid, "status": record.status.value, "result": value})

    async def send(request: Request, caller: Caller) -> Response:
        uuid = request.path_params["uuid"]
        body = await json_object(request, '{"name": "approved", "payload": {...}}')
        await record_for(caller, uuid)
        name, payload = body.get("name"), body.get("payload", NO_PAYLOAD)
        if not isinstance(name, str) or not name:
            raise InvalidMessageError('a message needs a name: send {"name": "approved", "payload": ...}')
        message = await off_loop(orchestrator.send, uuid, name, payload)
        logger.info("api: sent %s to %s by %s", name, uuid, caller.label)
        return JSONResponse({"uuid": uuid, "sent": name, "message": message.to_dict()})

    def acting(action: str) -> Handler:
        async def act(request: Request, caller: Caller) -> Response:
            uuid = request.path_params["uuid"]
            body = await json_object(request, '{"reason": "why"}', empty_ok=True)
            reason = body.get("reason")
            if reason is not None and not isinstance(reason, str):
                raise InvalidParamsError(f"reason must be a text, got {type(reason).__name__}")
            await record_for(caller, uuid)
            method = orchestrator.cancel if action == "cancel" else orchestrator.retry
            state = await off_loop(lambda: method(uuid, actor=f"api ({caller.label})", reason=reason))
            logger.info("api: %s %s by %s", action, uuid, caller.label)
            return JSONResponse(state.pipeline.to_dict())

        return act

    async def stream(request: Request, caller: Caller) -> Response:
        """The pipeline's stream as server-sent events, as the dashboard's own stream route."""
        uuid = request.path_params["uuid"]
        await record_for(caller, uuid)
        try:
            after = streams_api.cursor_of(request)
        except ValueError as exc:
            raise ApiAuthError(str(exc), 400) from None
        return StreamingResponse(
            streams_api.events(orchestrator, off_loop, uuid, after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def listing(request: Request, caller: Caller) -> Response:
        filters = views.filters_from(request.query_params)
        if caller.names is not None and filters.get("name") not in caller.names:
            raise ApiAuthError(
                f"token {caller.label!r} may only list pipelines named {', '.join(sorted(caller.names))}: "
                "add name=NAME to the query",
                403,
            )
        page = await off_loop(_page, orchestrator, filters)
        return JSONResponse({"pipelines": [record.to_dict() for record in page.pipelines], "total": page.total,
                             "next_after": page.next_after})  # fmt: skip

    async def document(request: Request, caller: Caller) -> Response:
        return JSONResponse(openapi(orchestrator.registry))

    return [
        Route("/openapi.json", guarded(None, document)),
        Route("/pipelines", guarded("read", listing)),
        Route("/pipelines/{uuid}/result", guarded("read", result)),
        Route("/pipelines/{uuid}/send", guarded("act", send), methods=["POST"]),
        Route("/pipelines/{uuid}/cancel", guarded("act", acting("cancel")), methods=["POST"]),
        Route("/pipelines/{uuid}/retry", guarded("act", acting("retry")), methods=["POST"]),
        Route("/pipelines/{uuid}/stream", guarded("read", stream), methods=["GET"]),
        Route("/pipelines/{uuid}", guarded("read", get), methods=["GET"]),
        Route("/pipelines/{name}", guarded("start", start), methods=["POST"]),
    ]


def refusal(exc: ProrchError) -> JSONResponse:
    """``{"error": {"type", "message"}}`` with the HTTP code that says what was wrong; a store that
    failed (down, locked, lost connection) is a 503 with ``Retry-After``: the request was fine,
    nothing was stored, and the same request may succeed later."""
    status, message = status_of(exc), str(exc)
    if status != 503:
        return JSONResponse({"error": {"type": type(exc).__name__, "message": message}}, status_code=status)
    message = f"the store is unavailable, nothing was done: {message}; try again later"
    return JSONResponse({"error": {"type": type(exc).__name__, "message": message}}, status_code=503,
                        headers={"Retry-After": str(STORE_RETRY_AFTER)})  # fmt: skip


def status_of(exc: ProrchError) -> int:
    if isinstance(exc, ApiAuthError):
        return exc.status
    if isinstance(exc, (CorruptRecordError, CorruptStoreError)):
        return 500  # stored data prorch cannot read: the same request will fail again, so no 503
    if isinstance(exc, RepositoryError) and not isinstance(exc, ConcurrentUpdateError):
        return 503
    if isinstance(exc, (NotRegisteredError, PipelineNotFoundError)):
        return 404
    if isinstance(exc, (KeyConflictError, InvalidStateError, ConcurrentUpdateError)):
        return 409
    if isinstance(exc, InvalidParamsError):
        return 422
    return 400


async def json_object(request: Request, example: str, *, empty_ok: bool = False) -> dict[str, Any]:
    """The request's body, a JSON object (like ``example``); an empty body is ``{}`` if ``empty_ok``."""
    raw = await request.body()
    if not raw.strip() and empty_ok:
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise InvalidMessageError(f"the body is not JSON ({exc}): send a JSON object, {example}") from exc
    if not isinstance(body, dict):
        raise InvalidMessageError(f"the body is {type(body).__name__}: send a JSON object, {example}")
    return body


def start_options(body: dict[str, Any]) -> dict[str, Any]:
    """``Pipeline.create``'s arguments from a start request's body, checked, or one error."""
    unknown = sorted(set(body) - set(START_FIELDS))
    if unknown:
        raise InvalidParamsError(f"unknown field {', '.join(unknown)}: a start takes {', '.join(START_FIELDS)}")
    options = {name: body[name] for name in START_FIELDS if body.get(name) is not None}
    typed = (("version", int, "an integer"), ("priority", int, "an integer"), ("key", str, "a text"),
             ("tenant", str, "a text"), ("if_running", str, "a text"))  # fmt: skip
    for name, kind, what in typed:
        value = options.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise InvalidParamsError(f"{name} must be {what}, got {type(value).__name__}")
    attributes = options.get("attributes")
    if attributes is not None and (
        not isinstance(attributes, dict) or not all(isinstance(v, str) for v in attributes.values())
    ):
        raise InvalidParamsError('attributes must be a JSON object of texts, e.g. {"customer": "acme"}')
    if "debounce" in options:
        options["debounce"] = debounce_of(options["debounce"])
    return options


def debounce_of(value: Any) -> timedelta:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return timedelta(seconds=value)
    if isinstance(value, str):
        return parse_age(value, "debounce")
    raise InvalidParamsError(f'debounce must be a positive number of seconds or a text like "30s", got {value!r}')


def wait_seconds(text: str | None) -> float:
    """The long poll's ``timeout`` (seconds, default 0: answer at once), capped to ``MAX_WAIT``."""
    if text is None or not text.strip():
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        raise InvalidParamsError(f"timeout={text!r}: give a number of seconds, e.g. timeout=30") from None
    if not 0 <= seconds < float("inf"):
        raise InvalidParamsError(f"timeout={text!r}: give a number of seconds from 0 to {MAX_WAIT:g}")
    return min(seconds, MAX_WAIT)


def _create(orchestrator: Orchestrator, name: str, options: dict[str, Any]) -> Any:
    cls = pipeline_class(orchestrator.registry, name, options.pop("version", None))
    return cls.create(orchestrator.store.backend, options.pop("params", None), registry=orchestrator.registry,
                      clock=orchestrator.clock, **options)  # fmt: skip


def _page(orchestrator: Orchestrator, filters: dict[str, str]) -> Any:
    chosen = views.bulk_filters(filters, orchestrator.clock.now())
    limit = filters.get("limit", "50")
    if not limit.isdigit() or not 1 <= int(limit) <= 500:
        raise InvalidParamsError(f"limit={limit!r}: give a number from 1 to 500")
    return orchestrator.query(**{name: getattr(chosen, name) for name in views.LISTED}, limit=int(limit),
                              after=filters.get("after"), count=True)  # fmt: skip
