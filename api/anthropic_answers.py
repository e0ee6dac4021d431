"""The answers of Anthropic Messages as /openapi.json publishes them: their schemas (`SCHEMAS`) and the door's paths
(`PATHS`), kept apart from the request bodies (api/anthropic_schema.py, which check what a client sends; their `BODIES`
are published from here too)."""

from __future__ import annotations

from typing import Any

from api.anthropic_schema import BODIES as BODIES  # published with the door's answers
from api.openapi_parts import errors, json_content, op, ref

# ---- /openapi.json -------------------------------------------------------------------------------------------------


_INT = {"type": "integer"}
_STR = {"type": "string"}
SCHEMAS: dict[str, Any] = {  # answers' schemas under their names
    "AnthropicError": {
        "type": "object",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {"type": "object", "required": ["type", "message"], "properties": {"type": _STR, "message": _STR}},
        },
    },
    "AnthropicMessage": {
        "type": "object",
        "properties": {
            "id": _STR,
            "type": {"const": "message"},
            "role": {"const": "assistant"},
            "model": {**_STR, "description": "The name the request sent"},
            "content": {
                "type": "array",
                "items": {
                    "oneOf": [
                        {"type": "object", "properties": {"type": {"const": "text"}, "text": _STR}},
                        {
                            "type": "object",
                            "properties": {
                                "type": {"const": "tool_use"},
                                "id": _STR,
                                "name": _STR,
                                "input": {"type": "object"},
                            },
                        },
                    ]
                },
            },
            "stop_reason": {"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
            "stop_sequence": {"type": ["string", "null"]},
            "usage": {"type": "object", "properties": {"input_tokens": _INT, "output_tokens": _INT}},
        },
    },
    "AnthropicTokenCount": {"type": "object", "properties": {"input_tokens": _INT}},
}

_ERRORS = errors(400, 401, 404, 413, 429, 503, schema="AnthropicError")
_MESSAGE = {
    "description": "the message, or (stream: true) its events: message_start, content_block_start/delta/stop, "
    "message_delta, message_stop, ping",
    "content": {"application/json": {"schema": ref("AnthropicMessage")}, "text/event-stream": {}},
}
PATHS: dict[str, Any] = {  # /openapi.json paths
    "/v1/messages": {"post": op("Anthropic Messages", {"200": _MESSAGE, **_ERRORS}, "AnthropicMessagesRequest")},
    "/v1/messages/count_tokens": {
        "post": op(
            "Anthropic Messages: the prompt's tokens",
            {"200": {"description": "the count", **json_content(ref("AnthropicTokenCount"))}, **_ERRORS},
            "AnthropicCountTokensRequest",
        )
    },
}
