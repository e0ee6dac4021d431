"""The answers of the Ollama API as /openapi.json publishes them: their schemas (`SCHEMAS`) and the door's paths
(`PATHS`), kept apart from the request bodies (api/ollama_schema.py, which check what a client sends; their `BODIES`
are published from here too)."""

from __future__ import annotations

from typing import Any

from api.ollama_schema import BODIES as BODIES  # published with the door's answers
from api.openapi_parts import errors, json_content, op, ref

# ---- the answers ----------------------------------------------------------------------------------------------------


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


_STR, _INT, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
_TIME = {"type": "string", "format": "date-time"}
_DURATION = {"type": "integer", "description": "nanoseconds"}
_LOGPROBS = {
    "type": "array",
    "items": _object(
        ["token", "logprob"],
        token=_STR,
        logprob={"type": "number"},
        top_logprobs={"type": "array", "items": _object(["token", "logprob"], token=_STR, logprob={"type": "number"})},
    ),
}
_DONE = {  # the fields of an answer's last (or only) object
    "done": _BOOL,
    "done_reason": {"enum": ["stop", "length", "load", "unload"]},
    "total_duration": _DURATION,
    "load_duration": _DURATION,
    "prompt_eval_count": _INT,
    "prompt_eval_duration": _DURATION,
    "eval_count": _INT,
    "eval_duration": _DURATION,
    "logprobs": _LOGPROBS,
}
_MODEL = {
    "name": _STR,
    "model": _STR,
    "modified_at": _TIME,
    "size": {"type": "integer", "description": "bytes of weights where the backend knows them, else 0"},
    "digest": {"type": "string", "description": "empty: the weights are not an Ollama blob"},
    "details": ref("OllamaModelDetails"),
}

SCHEMAS: dict[str, Any] = {  # answers' schemas under their names
    "OllamaError": _object(["error"], error=_STR),
    "OllamaVersion": _object(["version"], version=_STR),
    "OllamaModelDetails": _object(
        [],
        parent_model=_STR,
        format=_STR,
        family=_STR,
        families={"type": "array", "items": _STR},
        parameter_size=_STR,
        quantization_level=_STR,
    ),
    "OllamaTags": _object(["models"], models={"type": "array", "items": _object(list(_MODEL), **_MODEL)}),
    "OllamaRunning": _object(
        ["models"],
        models={
            "type": "array",
            "items": _object(
                [*_MODEL, "expires_at", "size_vram"],
                **_MODEL,
                expires_at=_TIME,
                size_vram={"type": "integer", "description": "bytes of weights on an accelerator"},
                context_length=_INT,
            ),
        },
    ),
    "OllamaShowResponse": _object(
        ["details", "model_info", "capabilities"],
        modelfile=_STR,
        parameters=_STR,
        template=_STR,
        details=ref("OllamaModelDetails"),
        model_info={"type": "object", "description": "general.architecture and the context length where known"},
        capabilities={"type": "array", "items": _STR},
        modified_at=_TIME,
    ),
    "OllamaChatResponse": _object(
        ["model", "created_at", "message", "done"],
        model=_STR,
        created_at=_TIME,
        message=_object(
            ["role", "content"],
            role={"const": "assistant"},
            content=_STR,
            tool_calls={
                "type": "array",
                "items": _object(
                    ["function"],
                    function=_object(["name", "arguments"], name=_STR, arguments={"type": "object"}),
                ),
            },
        ),
        **_DONE,
    ),
    "OllamaGenerateResponse": _object(
        ["model", "created_at", "response", "done"], model=_STR, created_at=_TIME, response=_STR, **_DONE
    ),
}

_ERRORS = {"schema": "OllamaError"}
_NDJSON = "one JSON object, or (stream true, the default) NDJSON: one such object a line, the last with done: true"


def _answer(schema: str) -> dict[str, Any]:
    content = {"application/x-ndjson": {"schema": ref(schema)}, **json_content(ref(schema))["content"]}
    return {"200": {"description": _NDJSON, "content": content}}


def _listing(schema: str) -> dict[str, Any]:
    return {"200": {"description": "answer", **json_content(ref(schema))}}


PATHS: dict[str, Any] = {  # /openapi.json paths
    "/api/version": {
        "get": op("Ollama: the Ollama API version spoken", {**_listing("OllamaVersion"), **errors(401, **_ERRORS)})
    },
    "/api/tags": {
        "get": op("Ollama: served models", {**_listing("OllamaTags"), **errors(401, 503, **_ERRORS)}),
    },
    "/api/ps": {
        "get": op("Ollama: loaded models", {**_listing("OllamaRunning"), **errors(401, 503, **_ERRORS)}),
    },
    "/api/show": {
        "post": op(
            "Ollama: a model's details",
            {**_listing("OllamaShowResponse"), **errors(400, 401, 404, 413, 415, 503, **_ERRORS)},
            "OllamaShowRequest",
        )
    },
    "/api/chat": {
        "post": op(
            "Ollama chat",
            {**_answer("OllamaChatResponse"), **errors(400, 401, 404, 413, 415, 429, 503, **_ERRORS)},
            "OllamaChatRequest",
        )
    },
    "/api/generate": {
        "post": op(
            "Ollama generate",
            {**_answer("OllamaGenerateResponse"), **errors(400, 401, 404, 413, 415, 429, 503, **_ERRORS)},
            "OllamaGenerateRequest",
        )
    },
}
