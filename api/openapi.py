"""The OpenAPI 3.1 description served at /openapi.json, so standard API tools can call and test the server. The
request bodies' schemas are their pydantic models' (api/schema.py), the very models that check the bodies."""

from __future__ import annotations

import copy
import functools
from typing import Any

from api import anthropic_answers, completions_schema, ollama_answers, tokens_schema
from api.openapi_parts import REF, errors, json_content, op, ref
from api.schema import REQUEST_BODIES

# the doors beside the two first ones: each brings its bodies, its answers' schemas and its paths
DOORS = (completions_schema, anthropic_answers, ollama_answers, tokens_schema)
BODIES = {**REQUEST_BODIES, **{name: body for door in DOORS for name, body in door.BODIES.items()}}

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
        "properties": {
            **{k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
            "prompt_tokens_details": {
                "type": "object",
                "description": "OpenAI doors: the prompt tokens served from the prefix cache instead of prefilled",
                "properties": {"cached_tokens": {"type": "integer"}},
            },
        },
    },
    "ChatResponse": {
        "type": "object",
        "properties": {
            "query": {"type": "string"},
            "response": {"type": "string"},
            "history": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
            "finish_reason": {"enum": ["stop", "length"]},
            "usage": ref("Usage"),
            "success": {"type": "boolean"},
        },
    },
}


def _answer_schemas() -> dict[str, Any]:
    out = dict(SCHEMAS)
    for door in DOORS:
        if clash := out.keys() & door.SCHEMAS.keys():
            raise ValueError(f"two answer schemas are named {sorted(clash)}")
        out.update(door.SCHEMAS)
    return out


@functools.cache
def _request_schemas() -> dict[str, Any]:
    """Each request body's JSON Schema under its name, and the models it nests (its `$defs`) beside it."""
    schemas: dict[str, Any] = {}
    for name, model in BODIES.items():
        schema = model.model_json_schema(ref_template=REF)
        for nested, sub in schema.pop("$defs", {}).items():
            if schemas.setdefault(nested, sub) != sub:
                raise ValueError(f"two different request schemas are named {nested}")
        schemas[name] = schema
    answers = _answer_schemas()
    if clash := schemas.keys() & answers.keys():
        raise ValueError(f"request and answer schemas share names: {sorted(clash)}")
    return schemas


def build_spec(model_names: tuple[str, ...]) -> dict[str, Any]:
    """The spec for this server; `model_names`, the names the OpenAI `model` field takes, are listed in its
    description."""
    stream = {"200": {"description": "event: delta frames", "content": {"text/event-stream": {}}}}
    sse_or_json = {"text/event-stream": {}, "application/json": {"schema": {"type": "object"}}}
    answer = {"200": {"description": "answer", **json_content(ref("ChatResponse"))}}
    completion = {"200": {"description": "completion or chunk stream", "content": sse_or_json}}
    done = {"200": {"description": "done"}}
    ready = {"200": {"description": "ready"}}
    chatglm_errors = errors(400, 401, 413, 429, 503)
    return {
        "openapi": "3.1.0",
        "info": {"title": "chatglm-stream", "version": "0.1.0", "description": f"Serving {', '.join(model_names)}"},
        "components": {
            "schemas": {**copy.deepcopy(_answer_schemas()), **copy.deepcopy(_request_schemas())},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Only when the server has --api-key"},
                "apiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "The same key as Anthropic's clients send it",
                },
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],  # either
        "paths": {
            "/": {"get": op("Web chat page", {"200": {"description": "HTML"}}, open_=True)},
            "/chat": {"post": op("ChatGLM chat", {**answer, **chatglm_errors}, "ChatRequest")},
            "/stream": {"post": op("ChatGLM stream", {**stream, **chatglm_errors}, "ChatRequest")},
            "/clear": {
                "get": op("Empty the prefix cache, release cached accelerator memory", {**done, **errors(401)}),
                "post": op("Empty the prefix cache, release cached accelerator memory", {**done, **errors(401)}),
            },
            "/v1/models": {"get": op("Served models", {"200": {"description": "list"}, **errors(401)})},
            "/v1/chat/completions": {
                "post": op(
                    "OpenAI chat completions",
                    {**completion, **errors(400, 401, 404, 413, 429, 503)},
                    "CompletionRequest",
                )
            },
            "/health": {
                "get": op("Readiness", {**ready, "503": {"description": "loading or shutting down"}}, open_=True)
            },
            "/metrics": {"get": op("Prometheus metrics", {"200": {"description": "text format"}, **errors(401)})},
            "/openapi.json": {"get": op("This description", {"200": {"description": "OpenAPI 3.1"}}, open_=True)},
            **{path: copy.deepcopy(item) for door in DOORS for path, item in door.PATHS.items()},
        },
    }
