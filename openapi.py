"""The OpenAPI 3.1 description served at /openapi.json, so standard API tools can call and test the server."""

from __future__ import annotations

from typing import Any

from schema import MAX_CHOICES, MAX_STOPS


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "error", **_json(_ref("Error"))} for s in statuses}


SAMPLING = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "seed": {"type": "integer"},
    "min_tokens": {"type": "integer", "minimum": 0},
    "ignore_eos": {"type": "boolean"},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOPS}]},
    "max_tokens": {"type": "integer", "minimum": 1},
}

SCHEMAS: dict[str, Any] = {
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
    "ChatRequest": {
        "type": "object",
        "required": ["query"],
        "properties": {
            "query": {"type": "string", "minLength": 1},
            "history": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
            },
            "system": {"type": "string"},
            "max_length": {"type": "integer", "minimum": 1},
            **SAMPLING,
        },
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
    "CompletionRequest": {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "model": {"type": "string"},
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {
                        "role": {"enum": ["system", "developer", "user", "assistant"]},
                        "content": {
                            "oneOf": [
                                {"type": "string"},
                                {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["type", "text"],
                                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                                    },
                                },
                            ]
                        },
                    },
                },
            },
            "max_completion_tokens": {"type": "integer", "minimum": 1},
            "n": {"type": "integer", "minimum": 1, "maximum": MAX_CHOICES},
            "stream": {"type": "boolean"},
            "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
            **SAMPLING,
        },
    },
}


def _op(summary: str, responses: dict[str, Any], body: str | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body:
        op["requestBody"] = {"required": True, **_json(_ref(body))}
    return op


def build_spec(model_names: tuple[str, ...]) -> dict[str, Any]:
    """The spec for this server; `model_names` become the enum of the OpenAI `model` field's description."""
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
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
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
            "/health": {"get": _op("Readiness", {**ready, "503": {"description": "loading or shutting down"}})},
            "/metrics": {"get": _op("Prometheus metrics", {"200": {"description": "text format"}, **_errors(401)})},
            "/openapi.json": {"get": _op("This description", {"200": {"description": "OpenAPI 3.1"}})},
        },
    }
