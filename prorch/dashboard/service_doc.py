"""The OpenAPI 3.1 document of ``/api/v1/`` (``GET /api/v1/openapi.json``), generated from the
registered pipeline classes: one start path per pipeline name whose request body carries that
class's ``Params`` schema, and its ``Output`` schema where the class declares one (pydantic's
``model_json_schema``, whose JSON Schema 2020-12 OpenAPI 3.1 takes as it is)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from prorch.model.definition import PipelineDefinition
from prorch.model.registry import Registry

REF = "#/components/schemas/{model}"
ANY_OBJECT: dict[str, Any] = {"type": "object"}
DESCRIPTION = (
    "Start prorch pipelines and wait for their results (docs/api.md), and follow a pipeline's stream "
    "(what its hooks emit) as server-sent events."
)
ERROR = {"$ref": "#/components/schemas/Error"}


def openapi(registry: Registry) -> dict[str, Any]:
    schemas: dict[str, Any] = {"Error": _error_schema(), "Pipeline": {"type": "object"}}
    paths: dict[str, Any] = {}
    for name in sorted(registry.pipelines):
        versions = registry.pipelines[name]
        cls = versions[max(versions)]
        if cls.__module__.startswith("prorch."):
            continue  # prorch's own pipelines are not started by hand
        paths[f"/pipelines/{name}"] = {"post": _start(cls, schemas)}
    paths.update(_common())
    return {
        "openapi": "3.1.0",
        "info": {"title": "prorch HTTP API", "version": "1", "description": DESCRIPTION},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _schema(model: type[BaseModel] | None, title: str, schemas: dict[str, Any]) -> dict[str, Any]:
    """A ``$ref`` to ``model``'s schema, added to ``schemas`` with its ``$defs``, under ``title``."""
    if model is None:
        return ANY_OBJECT
    found = model.model_json_schema(ref_template=REF)
    schemas.update(found.pop("$defs", {}))
    schemas[title] = found
    return {"$ref": REF.format(model=title)}


def _start(cls: type[PipelineDefinition], schemas: dict[str, Any]) -> dict[str, Any]:
    params = _schema(cls.Params, f"{cls.name}.Params", schemas)
    output = _schema(cls.Output, f"{cls.name}.Output", schemas) if cls.Output is not None else None
    body = {
        "type": "object", "additionalProperties": False, "properties": {
            "params": params, "version": {"type": "integer"}, "key": {"type": "string", "maxLength": 200},
            "tenant": {"type": "string"}, "priority": {"type": "integer"},
            "attributes": {"type": "object", "additionalProperties": {"type": "string"}},
            "if_running": {"enum": ["same", "attach", "error"]},
            "debounce": {"oneOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string"}]},
        },
    }  # fmt: skip
    described = f"Start a {cls.name} pipeline (version {cls.version}); scope start."
    if output is not None:
        described += f" Its result (GET /pipelines/{{uuid}}/result) is a {cls.name}.Output."
    return {
        "summary": described, "operationId": f"start_{cls.name}",
        "requestBody": {"content": {"application/json": {"schema": body}}},
        "responses": {
            "201": _json("created", {"$ref": "#/components/schemas/Pipeline"}),
            "200": _json("already stored under its key", {"$ref": "#/components/schemas/Pipeline"}),
            **_errors("401", "403", "400", "404", "409", "422"),
        },
        **({"x-prorch-output": output} if output is not None else {}),
    }  # fmt: skip


def _common() -> dict[str, Any]:
    pipeline = _json("the pipeline", {"$ref": "#/components/schemas/Pipeline"})
    uuid = [{"name": "uuid", "in": "path", "required": True, "schema": {"type": "string"}}]
    timeout = {"name": "timeout", "in": "query", "schema": {"type": "number", "minimum": 0, "maximum": 60}}
    reason_body = {"type": "object", "properties": {"reason": {"type": "string"}}}
    reason = {"content": {"application/json": {"schema": reason_body}}}
    filters = [{"name": name, "in": "query", "schema": {"type": "string"}} for name in
               ("status", "state", "name", "version", "tenant", "key", "param", "since", "until", "attributes",
                "limit", "after")]  # fmt: skip
    return {
        "/pipelines": {"get": {"summary": "List pipelines, newest first; scope read.", "parameters": filters,
                               "responses": {"200": _json("a page", ANY_OBJECT), **_errors("401", "403", "422")}}},
        "/pipelines/{uuid}": {"get": {"summary": "One pipeline with its steps; scope read.", "parameters": uuid,
                                      "responses": {"200": pipeline, **_errors("401", "403", "404")}}},
        "/pipelines/{uuid}/result": {"get": {
            "summary": "Wait up to timeout seconds (long poll) for the result; scope read.",
            "parameters": [*uuid, timeout],
            "responses": {"200": _json("it ended: status and result, or error", ANY_OBJECT),
                          "202": _json("still running after the timeout: ask again", ANY_OBJECT),
                          **_errors("401", "403", "404", "422")}}},
        "/pipelines/{uuid}/send": {"post": {
            "summary": "Send it a message; scope act.", "parameters": uuid,
            "requestBody": {"content": {"application/json": {"schema": {
                "type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "payload": {}}}}}},
            "responses": {"200": _json("sent", ANY_OBJECT), **_errors("400", "401", "403", "404", "409")}}},
        "/pipelines/{uuid}/cancel": {"post": {"summary": "Cancel it; scope act.", "parameters": uuid,
                                              "requestBody": reason,
                                              "responses": {"200": pipeline, **_errors("401", "403", "404", "409")}}},
        "/pipelines/{uuid}/retry": {"post": {"summary": "Retry it from its failed step; scope act.",
                                             "parameters": uuid, "requestBody": reason,
                                             "responses": {"200": pipeline, **_errors("401", "403", "404", "409")}}},
        "/pipelines/{uuid}/stream": {"get": {
            "summary": "The pipeline's stream (self.emit) as server-sent events, id = the entry's seq; "
                       "?after=N or Last-Event-ID resumes; an 'end' event once the pipeline has ended; scope read.",
            "parameters": uuid,
            "responses": {"200": {"description": "text/event-stream", "content": {"text/event-stream": {}}},
                          **_errors("400", "401", "403", "404")}}},
    }  # fmt: skip


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: _json("refused: nothing stored", ERROR) for code in codes}


def _error_schema() -> dict[str, Any]:
    message = {"type": "object", "required": ["type", "message"],
               "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}  # fmt: skip
    return {"type": "object", "required": ["error"], "properties": {"error": message}}
