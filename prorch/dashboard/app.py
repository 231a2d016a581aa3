"""The dashboard's web app (Starlette): pages rendered with Jinja2 and refreshed by htmx, the
JSON API under ``/api/`` that the pages share their data with, and the guarded actions."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from prorch.dashboard import chart, views
from prorch.dashboard.security import LOCAL_HOSTS, SESSION_COOKIE, Guard, HostCheck, Throttle
from prorch.display import format_seconds, format_time
from prorch.model.exceptions import InvalidMessageError, InvalidParamsError, InvalidStateError, PipelineNotFoundError
from prorch.model.status import Status
from prorch.orchestrator import Orchestrator
from prorch.storage.outside import NO_PAYLOAD

HERE = Path(__file__).parent
REFRESH_SECONDS = 5
ACTIONS = ("cancel", "retry", "send")
FAILED_TOKEN_DELAY = 0.5
"""Seconds before a wrong token is answered: with ``Throttle``'s limit, guessing is slow."""
logger = logging.getLogger(__name__)
T = TypeVar("T")


def when(text: str | None) -> str:
    """A time from the JSON the pages share with the API (ISO), as ``prorch show`` prints it."""
    return format_time(datetime.fromisoformat(text)) if text else "-"


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def templates() -> Environment:
    environment = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    environment.filters.update(when=when, seconds=format_seconds, pretty=pretty)
    environment.globals.update(statuses=[s.value for s in Status], refresh=REFRESH_SECONDS, urlencode=urlencode)
    return environment


def create_app(
    orchestrator: Orchestrator,
    *,
    token: str | None = None,
    store_name: str = "",
    allowed_hosts: Iterable[str] = LOCAL_HOSTS,
) -> Starlette:
    """The dashboard over ``orchestrator``'s store. Without ``token`` it is read-only; with it,
    cancel, retry and send are allowed to a logged-in browser (with CSRF tokens) or to an API
    client that sends ``Authorization: Bearer TOKEN``. Only requests whose ``Host`` is one of
    ``allowed_hosts`` are answered (see ``security.allowed_hosts``)."""
    guard = Guard(token or None)
    throttle = Throttle()
    cache = views.StatsCache(orchestrator)
    environment = templates()
    off_loop = store_caller(orchestrator)

    def page(request: Request, template: str, status_code: int = 200, **data: Any) -> HTMLResponse:
        session = guard.session_of(request.cookies.get(SESSION_COOKIE))
        html = environment.get_template(template).render(
            request=request, store=store_name, read_only=guard.read_only, logged_in=session is not None,
            csrf=guard.csrf_for(session), **data,
        )  # fmt: skip
        return HTMLResponse(html, status_code=status_code)

    def failure(request: Request, exc: Exception, api: bool) -> Response:
        code = 404 if isinstance(exc, PipelineNotFoundError) else 409 if isinstance(exc, InvalidStateError) else 400
        if api:
            return JSONResponse({"error": str(exc)}, status_code=code)
        return page(request, "error.html", status_code=code, message=str(exc))

    async def overview_page(request: Request) -> Response:
        data = await off_loop(views.overview, orchestrator, cache)
        svg = Markup(chart.last_hour_svg(data["last_hour"]))  # numbers only: nothing user-given
        return page(request, "overview.html", data=data, chart=svg, totals=chart.totals(data["last_hour"]))

    async def pipelines_page(request: Request) -> Response:
        filters = views.filters_from(request.query_params)
        try:
            data = await off_loop(views.pipelines, orchestrator, filters)
        except (InvalidParamsError, PipelineNotFoundError) as exc:
            return page(request, "pipelines.html", status_code=400, data=None, filters=filters, message=str(exc))
        return page(request, "pipelines.html", data=data, filters=filters, message=None)

    async def pipeline_page(request: Request) -> Response:
        try:
            data = await off_loop(views.pipeline, orchestrator, request.path_params["uuid"])
        except PipelineNotFoundError as exc:
            return failure(request, exc, api=False)
        return page(request, "pipeline.html", data=data, done=request.query_params.get("done"))

    async def workers_page(request: Request) -> Response:
        return page(request, "workers.html", data=await off_loop(views.workers, orchestrator))

    async def api_workers(request: Request) -> Response:
        return JSONResponse(await off_loop(views.workers, orchestrator))

    def too_many(request: Request, api: bool) -> Response | None:
        """A 429 for a client that gave too many wrong tokens lately, else None."""
        wait = throttle.retry_after(_host(request))
        if wait is None:
            return None
        logger.warning("dashboard: refused a token from %s (too many wrong ones)", _client(request))
        message = f"too many wrong tokens from your address: try again in {wait}s"
        response = (
            JSONResponse({"error": message}, status_code=429)
            if api
            else page(request, "login.html", status_code=429, message=message)
        )
        response.headers["Retry-After"] = str(wait)
        return response

    async def wrong_token(request: Request) -> None:
        throttle.failed(_host(request))  # counted before the pause, so parallel guesses count too
        await asyncio.sleep(FAILED_TOKEN_DELAY)

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return page(request, "login.html", message=None)
        refused = None if guard.read_only else too_many(request, api=False)
        if refused is not None:
            return refused
        form = await request.form()
        offered = str(form.get("token", ""))
        if guard.read_only or not guard.token_matches(offered):
            logger.warning("dashboard: refused login from %s", _client(request))
            if not guard.read_only:
                await wrong_token(request)
            message = "this dashboard is read-only: no token is set" if guard.read_only else "wrong token"
            return page(request, "login.html", status_code=403, message=message)
        response = RedirectResponse(_local(str(form.get("next", "/"))), status_code=303)
        response.set_cookie(SESSION_COOKIE, guard.new_session(), httponly=True, samesite="strict")
        logger.info("dashboard: login from %s", _client(request))
        return response

    async def logout(request: Request) -> Response:
        guard.end_session(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    async def act_from_page(request: Request) -> Response:
        uuid, action = request.path_params["uuid"], request.path_params["action"]
        form = await request.form()
        cookie, csrf = request.cookies.get(SESSION_COOKIE, ""), str(form.get("csrf", ""))
        for value, what, fix in ((cookie, "session cookie", "log in again"), (csrf, "CSRF token", "reload the page")):
            if not value.isascii():
                return page(request, "error.html", status_code=400, message=f"the {what} is malformed: {fix}")
        session = guard.session_of(cookie)
        if guard.read_only or session is None or not guard.csrf_matches(session, csrf):
            logger.warning("dashboard: refused %s of %s from %s (not logged in)", action, uuid, _client(request))
            message = (
                "read-only: set PRORCH_DASHBOARD_TOKEN (or dashboard_token in prorch.toml) to allow actions"
                if guard.read_only
                else "log in with the dashboard token first (and reload the page if your session changed)"
            )
            return page(request, "error.html", status_code=403, message=message)
        try:
            done = await off_loop(act, orchestrator, uuid, action, form.get("name"), form.get("payload"))
        except (PipelineNotFoundError, InvalidStateError, InvalidMessageError, InvalidParamsError) as exc:
            return failure(request, exc, api=False)
        logger.info("dashboard: %s %s by %s", action, uuid, _client(request))
        cache.reset()
        return RedirectResponse(f"/pipelines/{uuid}?{urlencode({'done': done})}", status_code=303)

    async def api_overview(request: Request) -> Response:
        return JSONResponse(await off_loop(views.overview, orchestrator, cache))

    async def api_pipelines(request: Request) -> Response:
        try:
            filters = views.filters_from(request.query_params)
            return JSONResponse(await off_loop(views.pipelines, orchestrator, filters))
        except (InvalidParamsError, PipelineNotFoundError) as exc:
            return failure(request, exc, api=True)

    async def api_pipeline(request: Request) -> Response:
        try:
            return JSONResponse(await off_loop(views.pipeline, orchestrator, request.path_params["uuid"]))
        except PipelineNotFoundError as exc:
            return failure(request, exc, api=True)

    async def api_act(request: Request) -> Response:
        uuid, action = request.path_params["uuid"], request.path_params["action"]
        header = request.headers.get("authorization")
        refused = None if guard.read_only or header is None else too_many(request, api=True)
        if refused is not None:
            return refused
        if guard.read_only or not guard.bearer_matches(header):
            logger.warning("dashboard: refused API %s of %s from %s", action, uuid, _client(request))
            if not guard.read_only and header is not None:
                await wrong_token(request)
            reason = "read-only: no dashboard token is set" if guard.read_only else "send Authorization: Bearer TOKEN"
            return JSONResponse({"error": reason}, status_code=403)
        try:
            body = await _json_object(request) if action == "send" else {}
            payload = json.dumps(body["payload"]) if "payload" in body else None  # left out: no payload
            done = await off_loop(act, orchestrator, uuid, action, body.get("name"), payload)
        except (PipelineNotFoundError, InvalidStateError, InvalidMessageError, InvalidParamsError) as exc:
            return failure(request, exc, api=True)
        logger.info("dashboard: API %s %s by %s", action, uuid, _client(request))
        cache.reset()
        return JSONResponse({"done": done, **await off_loop(views.pipeline, orchestrator, uuid)})

    action_path = "/pipelines/{uuid}/{action:str}"
    routes = [
        Route("/", overview_page),
        Route("/pipelines", pipelines_page),
        Route("/pipelines/{uuid}", pipeline_page),
        Route("/workers", workers_page),
        Route(action_path, act_from_page, methods=["POST"]),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/api/overview", api_overview),
        Route("/api/pipelines", api_pipelines),
        Route("/api/pipelines/{uuid}", api_pipeline),
        Route("/api/workers", api_workers),
        Route("/api" + action_path, api_act, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(HostCheck, allowed=list(allowed_hosts))])


def store_caller(orchestrator: Orchestrator) -> Callable[..., Any]:
    """``await off_loop(fn, *args)``: ``fn(*args)`` in Starlette's thread pool, so that a slow query
    or a blocking ``on_cancel`` hook holds only its own request, never the event loop (the store is
    synchronous). On a backend that is not thread-safe the calls take turns."""
    turns: contextlib.AbstractContextManager[Any] = (
        contextlib.nullcontext() if orchestrator.store.thread_safe else threading.Lock()
    )

    def taking_turns(fn: Callable[..., T], *args: Any) -> T:
        with turns:
            return fn(*args)

    async def off_loop(fn: Callable[..., T], *args: Any) -> T:
        return await run_in_threadpool(functools.partial(taking_turns, fn, *args))

    return off_loop


def act(orchestrator: Orchestrator, uuid: str, action: str, name: Any, payload: Any) -> str:
    """Run one action; what to tell the user it did."""
    if action == "cancel":
        state = orchestrator.cancel(uuid)
        return "cancelled" if state.pipeline.status == Status.CANCELLED else "cancel requested"
    if action == "retry":
        orchestrator.retry(uuid)
        return "retrying"
    if action == "send":
        if not name:
            raise InvalidMessageError("a message needs a name")
        try:
            value = json.loads(payload) if payload not in (None, "") else NO_PAYLOAD
        except json.JSONDecodeError as exc:
            raise InvalidMessageError(f"the payload is not valid JSON: {exc}") from exc
        orchestrator.send(uuid, str(name), value)
        return f"sent {name}"
    raise InvalidParamsError(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")


async def _json_object(request: Request) -> dict[str, Any]:
    """The request's body, which must be a JSON object."""
    try:
        body = json.loads(await request.body())
    except ValueError as exc:  # not JSON, or not UTF-8
        raise InvalidMessageError(
            f'the body is not JSON ({exc}): send a JSON object, {{"name": ..., "payload": ...}}'
        ) from exc
    if not isinstance(body, dict):
        raise InvalidMessageError(
            f'the body is {type(body).__name__}: send a JSON object, {{"name": ..., "payload": ...}}'
        )
    return body


def _host(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


def _local(target: str) -> str:
    """Only redirect within the dashboard (no open redirect through ``next``)."""
    return target if target.startswith("/") and not target.startswith("//") else "/"
