"""The OpenAPI 3.1 description served at /openapi.json, so standard API tools can call and test the server. The
request bodies' schemas are their pydantic models' (api/schema.py), the very models that check the bodies."""

from __future__ import annotations

import copy
import functools
from typing import Any

from api.schema import REQUEST_BODIES

REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "error", **_json(_ref("Error"))} for s in statuses}


SCHEMAS: dict[str, Any] = {  # the answers' schemas; the request bodies' come from their pydantic models
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "Usage": {
        "type": "object",
        "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
    },
    "ChatResponse": {
        "type": "object",
        "properties": {
            "query": {"type": "string"},
            "response": {"type": "string"},
            "history": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
            "finish_reason": {"enum": ["stop", "length"]},
            "usage": _ref("Usage"),
            "success": {"type": "boolean"},
        },
    },
}


@functools.cache
def _request_schemas() -> dict[str, Any]:
    """Each request body's JSON Schema under its name, and the models it nests (its `$defs`) beside it."""
    schemas: dict[str, Any] = {}
    for name, model in REQUEST_BODIES.items():
        schema = model.model_json_schema(ref_template=REF)
        for nested, sub in schema.pop("$defs", {}).items():
            if schemas.setdefault(nested, sub) != sub:
                raise ValueError(f"two different request schemas are named {nested}")
        schemas[name] = schema
    if clash := schemas.keys() & SCHEMAS.keys():
        raise ValueError(f"request and answer schemas share names: {sorted(clash)}")
    return schemas


def _op(summary: str, responses: dict[str, Any], body: str | None = None, *, open_: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body:
        op["requestBody"] = {"required": True, **_json(_ref(body))}
    if open_:
        op["security"] = []  # no API key, even when the server has one
    return op


def build_spec(model_names: tuple[str, ...]) -> dict[str, Any]:
    """The spec for this server; `model_names`, the names the OpenAI `model` field takes, are listed in its
    description."""
    stream = {"200": {"description": "event: delta frames", "content": {"text/event-stream": {}}}}
    sse_or_json = {"text/event-stream": {}, "application/json": {"schema": {"type": "object"}}}
    answer = {"200": {"description": "answer", **_json(_ref("ChatResponse"))}}
    completion = {"200": {"description": "completion or chunk stream", "content": sse_or_json}}
    done = {"200": {"description": "done"}}
    ready = {"200": {"description": "ready"}}
    chatglm_errors = _errors(400, 401, 413, 429, 503)
    return {
        "openapi": "3.1.0",
        "info": {"title": "chatglm-stream", "version": "0.1.0", "description": f"Serving {', '.join(model_names)}"},
        "components": {
            "schemas": {**SCHEMAS, **copy.deepcopy(_request_schemas())},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Only when the server has --api-key"}
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/": {"get": _op("Web chat page", {"200": {"description": "HTML"}}, open_=True)},
            "/chat": {"post": _op("ChatGLM chat", {**answer, **chatglm_errors}, "ChatRequest")},
            "/stream": {"post": _op("ChatGLM stream", {**stream, **chatglm_errors}, "ChatRequest")},
            "/clear": {
                "get": _op("Release cached accelerator memory", {**done, **_errors(401)}),
                "post": _op("Release cached accelerator memory", {**done, **_errors(401)}),
            },
            "/v1/models": {"get": _op("Served models", {"200": {"description": "list"}, **_errors(401)})},
            "/v1/chat/completions": {
                "post": _op(
                    "OpenAI chat completions",
                    {**completion, **_errors(400, 401, 404, 413, 429, 503)},
                    "CompletionRequest",
                )
            },
            "/health": {
                "get": _op("Readiness", {**ready, "503": {"description": "loading or shutting down"}}, open_=True)
            },
            "/metrics": {"get": _op("Prometheus metrics", {"200": {"description": "text format"}, **_errors(401)})},
            "/openapi.json": {"get": _op("This description", {"200": {"description": "OpenAPI 3.1"}}, open_=True)},
        },
    }
