"""The wire of `POST /tokenize` and `POST /detokenize` (vLLM's shape, which llama.cpp's clients read too):
its request bodies (pydantic models that check them and are published as they are),
its answers' schemas and its /openapi.json paths.

A prompt is tokenized as the doors prompt the model, never otherwise: a raw `prompt` as /v1/completions sends it,
`messages` (with their tools) as /v1/chat/completions does, through the chat template. The messages and tools are the
chat door's own definitions (api/messages.py, api/tool_fields.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.messages import ChatMessage, answered, message
from api.openapi_parts import errors, json_content, op, ref
from api.tool_fields import ToolFields, tools_of
from api.wire import INT_MAX, INTEGRAL, Says, Wire, validate
from backends.base import InvalidField, Message, Tool, ToolChoice

_ALWAYS = "the server tokenizes a prompt only as it prompts the model"


@dataclass(frozen=True)
class TokenizeRequest:
    """A checked `/tokenize` request: a raw `prompt`, or `messages` with the tools they may call."""

    model: str | None
    prompt: str | None
    messages: tuple[Message, ...] = ()
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)


@dataclass(frozen=True)
class DetokenizeRequest:
    """A checked `/detokenize` request."""

    model: str | None
    tokens: tuple[int, ...]


class _TokenizeFields(Wire):
    model: str | None = None
    prompt: str | None = Field(None, description="A raw text prompt, tokenized as /v1/completions prompts it")
    add_special_tokens: (
        Annotated[Literal[True], Says(f"must be true or null: {_ALWAYS}, with its special tokens")] | None
    ) = Field(None, description="Only true, and only with prompt: the special tokens a text starts with are there")
    messages: Annotated[list[ChatMessage], Field(min_length=1), Says("must be a non-empty array")] | None = Field(
        None, description="A conversation, tokenized through the chat template as /v1/chat/completions does"
    )
    add_generation_prompt: (
        Annotated[Literal[True], Says(f"must be true or null: {_ALWAYS}, ready for the answer")] | None
    ) = Field(None, description="Only true, and only with messages: the prompt ends where the answer starts")


class TokenizeBody(ToolFields, _TokenizeFields):  # its own fields first: checked, and published, in this order
    """The body of `/tokenize`: exactly one of prompt and messages; the tool fields only with messages."""

    model_config = ConfigDict(title="TokenizeRequest")


_TokenId = Annotated[int, Field(ge=0, le=INT_MAX), INTEGRAL]


class DetokenizeBody(Wire):
    """The body of `/detokenize`."""

    model_config = ConfigDict(title="DetokenizeRequest")

    model: str | None = None
    tokens: Annotated[list[_TokenId], Says("must be an array of token ids (whole numbers from 0)", beneath=True)]


_CHAT_ONLY = ("add_generation_prompt", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")


def parse_tokenize(body: dict[str, Any]) -> TokenizeRequest:
    """Validate a `/tokenize` body."""
    wire = validate(TokenizeBody, body)
    if wire.prompt is None and wire.messages is None:
        raise InvalidField("prompt", "'prompt' or 'messages' is required")
    if wire.prompt is not None and wire.messages is not None:
        raise InvalidField("messages", "'messages' cannot be sent with 'prompt': send one of them")
    if wire.prompt is not None:
        if sent := [name for name in _CHAT_ONLY if getattr(wire, name) is not None]:
            raise InvalidField(sent[0], f"'{sent[0]}' is only for 'messages', not for a raw 'prompt'")
        return TokenizeRequest(wire.model, wire.prompt)
    if wire.add_special_tokens is not None:
        why = "a chat template places the special tokens itself"
        raise InvalidField("add_special_tokens", f"'add_special_tokens' is only for a raw 'prompt': {why}")
    tools, choice = tools_of(wire, body)
    messages = answered(tuple(message(i, m) for i, m in enumerate(wire.messages or ())))
    return TokenizeRequest(wire.model, None, messages, tools, choice)


def parse_detokenize(body: dict[str, Any]) -> DetokenizeRequest:
    """Validate a `/detokenize` body."""
    wire = validate(DetokenizeBody, body)
    return DetokenizeRequest(wire.model, tuple(wire.tokens))


BODIES: dict[str, type[BaseModel]] = {"TokenizeRequest": TokenizeBody, "DetokenizeRequest": DetokenizeBody}

SCHEMAS: dict[str, Any] = {  # answers' schemas under their names
    "TokenizeResponse": {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "description": "How many tokens the prompt is"},
            "max_model_len": {"type": ["integer", "null"], "description": "The model's context length"},
            "tokens": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "DetokenizeResponse": {"type": "object", "properties": {"prompt": {"type": "string"}}},
}


def _answer(name: str) -> dict[str, Any]:
    return {"200": {"description": "answer", **json_content(ref(name))}}


PATHS: dict[str, Any] = {
    "/tokenize": {
        "post": op(
            "A prompt's token ids, as the model would be prompted with it",
            {**_answer("TokenizeResponse"), **errors(400, 401, 404, 413, 503)},
            "TokenizeRequest",
        )
    },
    "/detokenize": {
        "post": op(
            "The text of token ids",
            {**_answer("DetokenizeResponse"), **errors(400, 401, 404, 413, 503)},
            "DetokenizeRequest",
        )
    },
}
