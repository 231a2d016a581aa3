"""The HTTP API for other services (``/api/v1/``) in the dashboard's app, over a real SQLite file,
called through ASGI in this process: every refusal (bad token, wrong scope, another name, bad
JSON, unknown name, invalid params) is its status, the CLI's message, and nothing stored; and
the calls a service makes, end to end on one store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")

from pydantic import BaseModel, SecretStr

from prorch import OnStartMixin, Orchestrator, Pipeline, Step
from prorch.config import ApiToken, load_settings
from prorch.dashboard import create_app
from prorch.model.registry import Registry

READ, ACT, START, ONLY_OTHER = ("r" * 20, "a" * 20, "s" * 20, "o" * 20)
TOKENS = {
    "reader": ApiToken(token=SecretStr(READ), scopes=["read"]),
    "actor": ApiToken(token=SecretStr(ACT), scopes=["act", "read"]),
    "starter": ApiToken(token=SecretStr(START), scopes=["start", "read"]),
    "other": ApiToken(token=SecretStr(ONLY_OTHER), scopes=["start", "read", "act"], names=["Other"]),
}


class InvoiceParams(BaseModel):
    customer: str
    amount: int


class Total(BaseModel):
    total: int


class Sum(OnStartMixin, Step):
    name = "Sum"
    Output = Total

    def on_start(self) -> None:
        self.finish(Total(total=self.params.amount * 2))


class Invoice(Pipeline):
    name = "Invoice"
    Params = InvoiceParams
    Output = Total
    steps = [Sum]


def call(app: Any, method: str, path: str, body: Any = None, token: str | None = None,
         raw: bytes | None = None) -> tuple[int, Any]:  # fmt: skip
    """One request through ASGI (no HTTP client needed): its status and JSON body."""
    data = raw if raw is not None else json.dumps(body).encode() if body is not None else b""
    target, _, query = path.partition("?")
    headers = [(b"host", b"localhost"), (b"content-type", b"application/json")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    scope = {"type": "http", "method": method, "path": target, "raw_path": target.encode(), "root_path": "",
             "query_string": query.encode(), "headers": headers, "client": ("127.0.0.1", 5000),
             "server": ("localhost", 80), "scheme": "http", "asgi": {"version": "3.0"}}  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": data, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(content)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Any, Orchestrator]:
    registry = Registry()
    registry.add_step(Sum)
    registry.add_pipeline(Invoice)
    orchestrator = Orchestrator(f"sqlite:///{tmp_path / 'api.db'}", registry=registry)
    return create_app(orchestrator, api_tokens=TOKENS), orchestrator


def stored(orchestrator: Orchestrator) -> int:
    return len(orchestrator.list_pipelines())


GOOD = {"params": {"customer": "acme", "amount": 21}}


@pytest.mark.parametrize(
    ("token", "raw", "path", "status", "message"),
    [
        (None, None, "/api/v1/pipelines/Invoice", 401, "send the API token as Authorization: Bearer TOKEN"),
        ("x" * 20, None, "/api/v1/pipelines/Invoice", 401, "wrong API token"),
        (READ, None, "/api/v1/pipelines/Invoice", 403, "token 'reader' lacks the 'start' scope"),
        (ONLY_OTHER, None, "/api/v1/pipelines/Invoice", 403, "may not touch pipelines named 'Invoice' (only Other)"),
        (START, b"{not json", "/api/v1/pipelines/Invoice", 400, "the body is not JSON"),
        (START, b"[1]", "/api/v1/pipelines/Invoice", 400, "the body is list: send a JSON object"),
        (START, None, "/api/v1/pipelines/Nope", 404, "'Nope'"),
        (
            START,
            b'{"params": {"customer": "acme", "amount": "many"}}',
            "/api/v1/pipelines/Invoice",
            422,
            "params for pipeline Invoice",
        ),
        (START, b'{"params": {}, "colour": 1}', "/api/v1/pipelines/Invoice", 422, "unknown field colour"),
        (
            START,
            b'{"params": {"customer": "a", "amount": 1}, "if_running": "attach"}',
            "/api/v1/pipelines/Invoice",
            422,
            "if_running='attach' needs key=",
        ),
    ],
)
def test_a_refused_start_says_why_and_stores_nothing(
    setup: tuple[Any, Orchestrator], token: str | None, raw: bytes | None, path: str, status: int, message: str
) -> None:
    app, orchestrator = setup
    got, body = call(app, "POST", path, GOOD, token=token, raw=raw)
    assert got == status, body
    assert message in body["error"]["message"] and body["error"]["type"]
    assert stored(orchestrator) == 0


@pytest.mark.parametrize(
    ("action", "token", "raw", "status", "message"),
    [
        ("send", READ, b'{"name": "go"}', 403, "token 'reader' lacks the 'act' scope"),
        ("send", ONLY_OTHER, b'{"name": "go"}', 403, "may not touch pipelines named 'Invoice'"),
        ("send", ACT, b'{"name": "go",', 400, "the body is not JSON"),
        ("send", ACT, b'{"payload": 1}', 400, "a message needs a name"),
        ("cancel", READ, b"", 403, "token 'reader' lacks the 'act' scope"),
        ("cancel", ONLY_OTHER, b"", 403, "may not touch pipelines named 'Invoice'"),
        ("cancel", ACT, b'{"reason": 7}', 422, "reason must be a text"),
        ("cancel", "x" * 20, b"", 401, "wrong API token"),
    ],
)
def test_a_refused_action_says_why_and_changes_nothing(
    setup: tuple[Any, Orchestrator], action: str, token: str, raw: bytes, status: int, message: str
) -> None:
    app, orchestrator = setup
    uuid = Invoice.create(orchestrator.store.backend, GOOD["params"], registry=orchestrator.registry).uuid
    got, body = call(app, "POST", f"/api/v1/pipelines/{uuid}/{action}", token=token, raw=raw)
    assert got == status, body
    assert message in body["error"]["message"]
    assert orchestrator.store.messages_of(uuid) == []
    assert orchestrator.get(uuid).pipeline.status.value == "pending" and len(orchestrator.history(uuid)) == 1


def test_the_cli_and_the_api_say_the_same_for_invalid_params(setup: tuple[Any, Orchestrator]) -> None:
    app, orchestrator = setup
    with pytest.raises(Exception) as raised:
        Invoice.create(orchestrator.store.backend, {"customer": "acme"}, registry=orchestrator.registry)
    got, body = call(app, "POST", "/api/v1/pipelines/Invoice", {"params": {"customer": "acme"}}, token=START)
    assert got == 422 and body["error"] == {"type": "InvalidParamsError", "message": str(raised.value)}
    assert stored(orchestrator) == 0


def test_without_configured_tokens_every_call_is_401(tmp_path: Path) -> None:
    app = create_app(Orchestrator(f"sqlite:///{tmp_path / 'none.db'}", registry=Registry()))
    got, body = call(app, "GET", "/api/v1/pipelines", token=READ)
    assert got == 401 and "PRORCH_API_TOKENS" in body["error"]["message"]


def test_start_get_result_cancel_retry_list_and_send(setup: tuple[Any, Orchestrator]) -> None:
    app, orchestrator = setup
    got, created = call(app, "POST", "/api/v1/pipelines/Invoice", {**GOOD, "key": "inv-1", "attributes":
                        {"customer": "acme"}, "priority": 3}, token=START)  # fmt: skip
    assert got == 201 and created["created"] is True and created["priority"] == 3
    uuid = created["uuid"]
    again, same = call(app, "POST", "/api/v1/pipelines/Invoice", {**GOOD, "key": "inv-1"}, token=START)
    assert again == 200 and same["uuid"] == uuid and same["created"] is False
    conflict, body = call(app, "POST", "/api/v1/pipelines/Invoice", {"params": {"customer": "x", "amount": 1},
                          "key": "inv-1"}, token=START)  # fmt: skip
    assert conflict == 409 and body["error"]["type"] == "KeyConflictError"
    waiting, pending = call(app, "GET", f"/api/v1/pipelines/{uuid}/result?timeout=0.3", token=READ)
    assert waiting == 202 and pending["status"] == "pending" and "did not end within 0.3s" in pending["message"]
    assert call(app, "POST", f"/api/v1/pipelines/{uuid}/cancel", {}, token=READ)[0] == 403
    orchestrator.execute_pipelines()
    got, result = call(app, "GET", f"/api/v1/pipelines/{uuid}/result?timeout=5", token=READ)
    assert got == 200 and result == {"uuid": uuid, "status": "finished", "result": {"total": 42}}
    got, one = call(app, "GET", f"/api/v1/pipelines/{uuid}", token=READ)
    assert got == 200 and one["status"] == "finished" and [s["name"] for s in one["steps"]] == ["Sum"]
    got, page = call(app, "GET", "/api/v1/pipelines?attributes=customer%3Dacme&status=finished", token=READ)
    assert got == 200 and page["total"] == 1 and page["pipelines"][0]["uuid"] == uuid
    assert call(app, "GET", "/api/v1/pipelines", token=ONLY_OTHER)[0] == 403
    assert call(app, "GET", f"/api/v1/pipelines/{uuid}", token=ONLY_OTHER)[0] == 403
    got, body = call(app, "POST", f"/api/v1/pipelines/{uuid}/retry", {"reason": "again"}, token=ACT)
    assert got == 409 and body["error"]["type"] == "InvalidStateError"
    got, body = call(app, "POST", f"/api/v1/pipelines/{uuid}/send", {"payload": 1}, token=ACT)
    assert got == 400 and "a message needs a name" in body["error"]["message"]
    second = call(app, "POST", "/api/v1/pipelines/Invoice", GOOD, token=START)[1]["uuid"]
    got, body = call(app, "POST", f"/api/v1/pipelines/{second}/cancel", {"reason": "wrong amount"}, token=ACT)
    assert got == 200 and body["status"] == "cancelled"
    got, ended = call(app, "GET", f"/api/v1/pipelines/{second}/result", token=READ)
    assert got == 200 and ended["status"] == "cancelled" and ended["error"]["type"] == "PipelineFailedError"
    missing = call(app, "GET", "/api/v1/pipelines/00000000-0000-0000-0000-000000000000", token=READ)
    assert missing[0] == 404 and "no pipeline with uuid" in missing[1]["error"]["message"]


def test_the_openapi_document_carries_each_class_params_and_output(setup: tuple[Any, Orchestrator]) -> None:
    app, _ = setup
    got, document = call(app, "GET", "/api/v1/openapi.json", token=READ)
    assert got == 200 and document["openapi"] == "3.1.0"
    schemas = document["components"]["schemas"]
    assert schemas["Invoice.Params"]["required"] == ["customer", "amount"]
    assert schemas["Invoice.Output"]["properties"]["total"]["type"] == "integer"
    start = document["paths"]["/pipelines/Invoice"]["post"]
    body = start["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["params"] == {"$ref": "#/components/schemas/Invoice.Params"}
    assert "/pipelines/{uuid}/stream" in document["paths"]


def test_api_tokens_come_from_the_environment_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRORCH_API_TOKENS", json.dumps({"billing": {"token": READ, "scopes": ["read", "start"],
                                                                    "names": ["Invoice"]}}))  # fmt: skip
    loaded = load_settings(cwd=tmp_path)
    token = loaded.settings.api_tokens["billing"]
    assert token.scopes == ["read", "start"] and token.names == ["Invoice"]
    assert READ not in repr(loaded.settings)
    monkeypatch.setenv("PRORCH_API_TOKENS", json.dumps({"billing": {"token": READ, "scopes": ["write"]}}))
    with pytest.raises(Exception, match=r"api_tokens\.billing\.scopes"):
        load_settings(cwd=tmp_path)
    monkeypatch.setenv("PRORCH_API_TOKENS", json.dumps({"billing": {"token": "short", "scopes": ["read"]}}))
    with pytest.raises(Exception, match="a token needs 16 characters or more"):
        load_settings(cwd=tmp_path)


def stream_call(app: Any, path: str, token: str | None) -> tuple[int, str]:
    """A GET of a server-sent-events route through ASGI: its status and the whole text sent."""
    target, _, query = path.partition("?")
    headers = [(b"host", b"localhost")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    scope = {"type": "http", "method": "GET", "path": target, "raw_path": target.encode(), "root_path": "",
             "query_string": query.encode(), "headers": headers, "client": ("127.0.0.1", 5000),
             "server": ("localhost", 80), "scheme": "http", "asgi": {"version": "3.0"}}  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(30)  # the client stays connected until the response ends
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=20))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()


class Emit(OnStartMixin, Step):
    name = "Emit"

    def on_start(self) -> None:
        for n in range(3):
            self.emit({"n": n})
        self.finish()


class Emitting(Pipeline):
    name = "Emitting"
    steps = [Emit]


def test_the_stream_is_served_under_api_v1_with_the_read_scope_and_the_tokens_names(tmp_path: Path) -> None:
    """#30: the API serves a pipeline's stream to a service: entries in order, resumable after a
    cursor, behind the token's scope and names; a bad cursor is a 400 that says why."""
    registry = Registry()
    registry.add_step(Emit)
    registry.add_pipeline(Emitting)
    url = f"sqlite:///{tmp_path / 'api.db'}"
    orchestrator = Orchestrator(url, registry=registry)
    app = create_app(orchestrator, api_tokens=TOKENS)
    uuid = Emitting.create(url, registry=registry).uuid
    orchestrator.execute_pipelines()

    status, text = stream_call(app, f"/api/v1/pipelines/{uuid}/stream", READ)
    assert status == 200, text
    assert [line for line in text.splitlines() if line.startswith("id:")] == ["id: 1", "id: 2", "id: 3"]
    assert "event: end" in text and '"finished"' in text
    status, text = stream_call(app, f"/api/v1/pipelines/{uuid}/stream?after=2", READ)
    assert [line for line in text.splitlines() if line.startswith("id:")] == ["id: 3"]
    status, text = stream_call(app, f"/api/v1/pipelines/{uuid}/stream?after=x", READ)
    assert status == 400 and "is not a cursor" in text
    status, text = stream_call(app, f"/api/v1/pipelines/{uuid}/stream", ONLY_OTHER)
    assert status == 403, text
    status, text = stream_call(app, f"/api/v1/pipelines/{uuid}/stream", None)
    assert status == 401, text
