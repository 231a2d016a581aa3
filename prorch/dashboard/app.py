"""The dashboard's web app (Starlette): pages rendered with Jinja2 and refreshed by htmx, the
JSON API under ``/api/`` that the pages share their data with, and the guarded actions."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
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

from prorch.bulk import BulkSummary
from prorch.config import ApiToken
from prorch.dashboard import acting, chart, service_api, streams_api, timeline, versions_api, views
from prorch.dashboard.security import LOCAL_HOSTS, SESSION_COOKIE, Guard, HostCheck, Throttle
from prorch.display import format_seconds, format_time
from prorch.model.exceptions import (
    InvalidMessageError,
    InvalidParamsError,
    InvalidStateError,
    PipelineNotFoundError,
    ProrchError,
)
from prorch.model.status import Status
from prorch.model.substates import STATES
from prorch.orchestrator import Orchestrator

HERE = Path(__file__).parent
REFRESH_SECONDS = 5
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
    environment.globals.update(
        statuses=[s.value for s in Status],
        states=STATES,
        refresh=REFRESH_SECONDS,
        urlencode=urlencode,
        listed=views.LISTED,
    )
    return environment


def create_app(
    orchestrator: Orchestrator,
    *,
    token: str | None = None,
    store_name: str = "",
    allowed_hosts: Iterable[str] = LOCAL_HOSTS,
    api_tokens: Mapping[str, ApiToken] | None = None,
) -> Starlette:
    """The dashboard over ``orchestrator``'s store. Without ``token`` it is read-only; with it,
    cancel, retry and send are allowed to a logged-in browser (with CSRF tokens) or to an API
    client that sends ``Authorization: Bearer TOKEN``. Only requests whose ``Host`` is one of
    ``allowed_hosts`` are answered (see ``security.allowed_hosts``). ``api_tokens`` open the
    HTTP API for other services under ``/api/v1/`` (``service_api``)."""
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
        return page(request, "error.html", status_code=code, message=str(exc), still=True)

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
            data, bars = await off_loop(views.pipeline_and_bars, orchestrator, request.path_params["uuid"])
        except PipelineNotFoundError as exc:
            return failure(request, exc, api=False)
        gantt = Markup(timeline.svg(bars))  # user-given names and errors are escaped in it
        return page(request, "pipeline.html", data=data, gantt=gantt, done=request.query_params.get("done"))

    async def workers_page(request: Request) -> Response:
        return page(request, "workers.html", data=await off_loop(views.workers, orchestrator))

    async def api_workers(request: Request) -> Response:
        return JSONResponse(await off_loop(views.workers, orchestrator))

    async def versions_page(request: Request) -> Response:
        data = await off_loop(versions_api.versions_page, orchestrator)
        return page(request, "versions.html", data=data, still=True)  # a count over the whole store: on demand

    async def api_versions(request: Request) -> Response:
        return JSONResponse(await off_loop(versions_api.versions_view, orchestrator))

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

    def form_refusal(request: Request, form: Any, what: str) -> Response | None:
        """A 400/403 page unless the form comes from a logged-in session with its CSRF token."""
        cookie, csrf = request.cookies.get(SESSION_COOKIE, ""), str(form.get("csrf", ""))
        for value, part, fix in ((cookie, "session cookie", "log in again"), (csrf, "CSRF token", "reload the page")):
            if not value.isascii():
                return page(request, "error.html", status_code=400, message=f"the {part} is malformed: {fix}")
        session = guard.session_of(cookie)
        if guard.read_only or session is None or not guard.csrf_matches(session, csrf):
            logger.warning("dashboard: refused %s from %s (not logged in)", what, _client(request))
            message = (
                "read-only: set PRORCH_DASHBOARD_TOKEN (or dashboard_token in prorch.toml) to allow actions"
                if guard.read_only
                else "log in with the dashboard token first (and reload the page if your session changed)"
            )
            return page(request, "error.html", status_code=403, message=message)
        return None

    async def api_refusal(request: Request, what: str) -> Response | None:
        """A 403/429 unless the request carries the token as ``Authorization: Bearer``."""
        header = request.headers.get("authorization")
        refused = None if guard.read_only or header is None else too_many(request, api=True)
        if refused is not None:
            return refused
        if guard.read_only or not guard.bearer_matches(header):
            logger.warning("dashboard: refused API %s from %s", what, _client(request))
            if not guard.read_only and header is not None:
                await wrong_token(request)
            reason = "read-only: no dashboard token is set" if guard.read_only else "send Authorization: Bearer TOKEN"
            return JSONResponse({"error": reason}, status_code=403)
        return None

    async def act_from_page(request: Request) -> Response:
        uuid, action = request.path_params["uuid"], request.path_params["action"]
        form = await request.form()
        refused = form_refusal(request, form, f"{action} of {uuid}")
        if refused is not None:
            return refused
        try:
            if action in acting.CONFIRMED and form.get("confirm") != "yes":
                return await confirm_page(request, uuid, action, form)
            done = await off_loop(acting.act, orchestrator, uuid, action, form, f"dashboard ({_host(request)})")
        except ProrchError as exc:
            return failure(request, exc, api=False)
        logger.info("dashboard: %s %s by %s", action, uuid, _client(request))
        cache.reset()
        return RedirectResponse(f"/pipelines/{done.uuid}?{urlencode({'done': done.message})}", status_code=303)

    async def confirm_page(request: Request, uuid: str, action: str, form: Any) -> Response:
        """The step between a click and the action: what will be done, a reason, and a button."""
        data = await off_loop(views.pipeline, orchestrator, uuid)
        rerun = await off_loop(acting.check_rerun, orchestrator, uuid, form) if action == "rerun" else None
        return page(request, "confirm.html", data=data, action=action, rerun=rerun, reason=form.get("reason") or "",
                    still=True)  # fmt: skip

    async def search(request: Request) -> Response:
        text = request.query_params.get("q", "")
        try:
            uuid = await off_loop(views.find, orchestrator, text)
        except ProrchError as exc:
            if request.url.path.startswith("/api/"):
                return failure(request, exc, api=True)
            return page(request, "error.html", status_code=404 if text.strip() else 400, message=str(exc),
                        heading="Not found", still=True)  # fmt: skip
        if request.url.path.startswith("/api/"):
            return JSONResponse({"uuid": uuid})
        return RedirectResponse(f"/pipelines/{uuid}", status_code=303)

    async def bulk_from_page(request: Request) -> Response:
        form = await request.form()
        refused = form_refusal(request, form, "a bulk action")
        if refused is not None:
            return refused
        given = {name: str(form.get(name, "")) for name in views.LISTED}
        confirmed = form.get("confirm") == "yes"
        try:
            chosen = acting.bulk_request(form, given, orchestrator.clock.now(), f"dashboard ({_host(request)})")
            summary = await off_loop(_bulk, orchestrator, chosen, not confirmed)
        except ProrchError as exc:
            return page(request, "error.html", status_code=400, message=str(exc), still=True)
        if confirmed:
            logger.info("dashboard: bulk %s of %s by %s", chosen.action.action, chosen.given, _client(request))
            cache.reset()
        return page(request, "bulk.html", chosen=chosen, fields=form, summary=acting.summary_json(summary),
                    still=True)  # fmt: skip

    async def api_bulk(request: Request) -> Response:
        refused = await api_refusal(request, "bulk action")
        if refused is not None:
            return refused
        try:
            body = await _json_object(request, '{"action": ..., "filters": {...}, "dry_run": true}')
            actor = f"dashboard API ({_host(request)})"
            chosen = acting.bulk_request(body, body.get("filters", {}), orchestrator.clock.now(), actor)
            dry_run = acting.flag(body.get("dry_run"), "dry_run")
            summary = await off_loop(_bulk, orchestrator, chosen, dry_run)
        except ProrchError as exc:
            return failure(request, exc, api=True)
        if not dry_run:
            logger.info("dashboard: API bulk %s of %s by %s", chosen.action.action, chosen.given, _client(request))
            cache.reset()
        return JSONResponse({"filters": chosen.given, **acting.summary_json(summary)})

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
        refused = await api_refusal(request, f"{action} of {uuid}")
        if refused is not None:
            return refused
        try:
            body = await _json_object(request, '{"name": ..., "payload": ...}') if await request.body() else {}
            if action == "send":  # the payload as JSON text, as the form sends it; left out: no payload
                body = {"name": body.get("name"), "payload": json.dumps(body["payload"]) if "payload" in body else None}
            done = await off_loop(acting.act, orchestrator, uuid, action, body, f"dashboard API ({_host(request)})")
        except ProrchError as exc:
            return failure(request, exc, api=True)
        logger.info("dashboard: API %s %s by %s", action, uuid, _client(request))
        cache.reset()
        extra = {"original_uuid": uuid} if done.uuid != uuid else {}
        return JSONResponse({"done": done.message, **extra, **await off_loop(views.pipeline, orchestrator, done.uuid)})

    action_path = "/pipelines/{uuid}/{action:str}"
    routes = [
        Route("/", overview_page),
        Route("/pipelines", pipelines_page),
        Route("/pipelines/{uuid}", pipeline_page),
        Route("/workers", workers_page),
        Route("/versions", versions_page),
        Route("/search", search),
        Route("/bulk", bulk_from_page, methods=["POST"]),
        Route(action_path, act_from_page, methods=["POST"]),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Mount("/api/v1", routes=service_api.routes(orchestrator, api_tokens or {}, off_loop)),
        Route("/api/overview", api_overview),
        Route("/api/pipelines", api_pipelines),
        Route("/api/pipelines/{uuid}", api_pipeline),
        streams_api.route(orchestrator, off_loop),
        Route("/api/workers", api_workers),
        Route("/api/versions", api_versions),
        Route("/api/search", search),
        Route("/api/bulk", api_bulk, methods=["POST"]),
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


def _bulk(orchestrator: Orchestrator, chosen: acting.BulkRequest, dry_run: bool) -> BulkSummary:
    return orchestrator.bulk(chosen.action, chosen.filters, dry_run=dry_run)


async def _json_object(request: Request, example: str) -> dict[str, Any]:
    """The request's body, which must be a JSON object (like ``example``)."""
    try:
        body = json.loads(await request.body())
    except ValueError as exc:  # not JSON, or not UTF-8
        raise InvalidMessageError(f"the body is not JSON ({exc}): send a JSON object, {example}") from exc
    if not isinstance(body, dict):
        raise InvalidMessageError(f"the body is {type(body).__name__}: send a JSON object, {example}")
    return body


def _host(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


def _local(target: str) -> str:
    """Only redirect within the dashboard (no open redirect through ``next``)."""
    return target if target.startswith("/") and not target.startswith("//") else "/"
