"""The wire of Anthropic Messages (`POST /v1/messages`, `POST /v1/messages/count_tokens`):
its request bodies (pydantic models that check them and are published as they are; the answers' schemas and the
paths are in api/anthropic_answers.py).

A checked body becomes an `AnthropicRequest`, in the backends' words: `system` first as a system message, then each
message; the text blocks of one message (or of `system`, or of a tool result) join with "\\n" into one text, so a
single text block is the same prompt as the same string. An assistant's `tool_use` blocks are its calls, a user's
`tool_result` blocks are tool messages answering them (before the user's text, as Anthropic orders them). The tools
and the choice among them are read by the OpenAI door's own rules (api/tool_fields.py): `any` is its `required`,
`tool` its named function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NotRequired

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WrapValidator, with_config
from pydantic_core import InitErrorDetails, PydanticCustomError
from typing_extensions import TypedDict  # pydantic needs this TypedDict before Python 3.12

from api.tool_fields import FunctionName, ToolFields, arguments_text, tools_of
from api.wire import INT_MAX, INTEGRAL, NO_EFFECT, STRICT, Says, Wire, validate
from backends.base import InvalidField, Message, Sampling, Tool, ToolCall, ToolChoice

MAX_STOPS = 16


@dataclass(frozen=True)
class AnthropicRequest:
    """A checked `/v1/messages` body (a `/count_tokens` one: no sampling, no stream)."""

    model: str
    messages: tuple[Message, ...]
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    sampling: Sampling = field(default_factory=Sampling)
    stream: bool = False


# ---- content blocks ------------------------------------------------------------------------------------------------
# TypedDicts, not models, as api/messages.py has them: a long conversation is checked faster.


@with_config(STRICT)
class AnthropicCacheControl(TypedDict):
    type: Literal["ephemeral"]
    ttl: NotRequired[Literal["5m", "1h"]]


_CacheControl = Annotated[
    AnthropicCacheControl | None, Field(description=f"{NO_EFFECT}: this server keeps no prompt cache")
]


@with_config(STRICT)
class AnthropicTextBlock(TypedDict):
    type: Literal["text"]
    text: str
    cache_control: NotRequired[_CacheControl]
    citations: NotRequired[
        Annotated[None, Says("must be null: this server reads no citations"), Field(description="Only null")]
    ]


@with_config(STRICT)
class AnthropicToolUseBlock(TypedDict):
    """A call the assistant made (assistant messages only)."""

    type: Literal["tool_use"]
    id: Annotated[str, Field(min_length=1)]
    name: FunctionName
    input: dict[str, Any]
    cache_control: NotRequired[_CacheControl]


def _blocks(kinds: dict[str, Any], says: str, *, non_empty: bool = False) -> WrapValidator:
    """A string, or a list of the blocks `kinds` names by their `type`, each checked as its own kind: an error names
    the block's own field ("content[1].input"), where a union of the kinds would report every kind's complaint."""
    adapters = {kind: TypeAdapter(block) for kind, block in kinds.items()}
    names = [f'"{kind}"' for kind in kinds]
    allowed = " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"

    def check(value: Any, handler: Callable[[Any], Any]) -> Any:
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or (non_empty and not value):
            raise PydanticCustomError("says", "{says}", {"says": says})
        return [_block(adapters, allowed, i, item) for i, item in enumerate(value)]

    return WrapValidator(check)


def _block(adapters: dict[str, TypeAdapter[Any]], allowed: str, i: int, item: Any) -> Any:
    kind = item.get("type") if isinstance(item, dict) else None
    adapter = adapters.get(kind) if isinstance(kind, str) else None
    if adapter is None:
        if isinstance(item, dict):
            where: tuple[int | str, ...] = (i, "type")
            says = f"must be {allowed}: images, documents and other blocks are not supported (this server reads text)"
        else:
            where, says = (i,), f"must be an object: a block whose type is {allowed}"
        refused = PydanticCustomError("says", "{says}", {"says": says})
        raise ValidationError.from_exception_data("block", [{"type": refused, "loc": where, "input": kind}])
    try:
        return adapter.validate_python(item)
    except ValidationError as exc:  # the same errors, placed at this block
        moved: list[InitErrorDetails] = []
        for e in exc.errors(include_url=False):
            error = PydanticCustomError("says", "{says}", e["ctx"]) if e["type"] == "says" else e["type"]
            moved.append({"type": error, "loc": (i, *e["loc"]), "input": e["input"], "ctx": e.get("ctx") or {}})
        raise ValidationError.from_exception_data("block", moved) from None


_TextContent = Annotated[
    str | list[AnthropicTextBlock],
    _blocks({"text": AnthropicTextBlock}, "must be a string or a list of text blocks"),
]


@with_config(STRICT)
class AnthropicToolResultBlock(TypedDict):
    """A tool's result, answering a tool_use of the message before (user messages only)."""

    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(min_length=1)]
    content: NotRequired[_TextContent]
    is_error: NotRequired[
        Annotated[bool, Field(description='true: the result reaches the model as "Error: " and its text')]
    ]
    cache_control: NotRequired[_CacheControl]


_Content = Annotated[
    str | list[AnthropicTextBlock | AnthropicToolUseBlock | AnthropicToolResultBlock],
    _blocks(
        {"text": AnthropicTextBlock, "tool_use": AnthropicToolUseBlock, "tool_result": AnthropicToolResultBlock},
        "must be a string or a non-empty list of content blocks",
        non_empty=True,
    ),
]


@with_config(STRICT)
class AnthropicMessageParam(TypedDict):
    role: Literal["user", "assistant"]
    content: _Content


# ---- the bodies ----------------------------------------------------------------------------------------------------


class AnthropicTool(Wire):
    """A tool of the client's own (Anthropic's server tools, with a `type` of their own, do not run here)."""

    type: (
        Annotated[
            Literal["custom"],
            Says(
                'must be "custom" or left out: Anthropic\'s server tools (web search, code execution...) do not run '
                "on this server"
            ),
        ]
        | None
    ) = None
    name: FunctionName = Field(description="Letters, digits, _ and -, at most 64")
    description: str | None = None
    input_schema: dict[str, Any] = Field(description='A JSON Schema of the input: {"type": "object", ...}')
    strict: bool | None = Field(None, description="A forced call's input is held to `input_schema`")
    cache_control: _CacheControl = None


class AnthropicToolChoice(Wire):
    type: Literal["auto", "any", "tool", "none"] = Field(description="any: at least one call; tool: a call of `name`")
    name: FunctionName | None = Field(None, description="The tool to call, with type tool")
    disable_parallel_tool_use: bool | None = Field(None, description="true: at most one call per answer")


class AnthropicMetadata(Wire):
    user_id: str | None = Field(None, description=NO_EFFECT)


class _PromptFields(Wire):
    """What makes the prompt: the same in both bodies, so /count_tokens counts what /v1/messages prompts."""

    model: Annotated[str, Field(min_length=1)] = Field(
        description="Any name: the loaded model answers, and the answer repeats the name"
    )
    messages: Annotated[list[AnthropicMessageParam], Field(min_length=1), Says("must be a non-empty array")] = Field(
        description="user and assistant turns; the last is a user's (an assistant's to continue is not supported)"
    )
    system: (
        Annotated[
            str | list[AnthropicTextBlock],
            _blocks({"text": AnthropicTextBlock}, "must be a string or a list of text blocks"),
        ]
        | None
    ) = None
    tools: Annotated[list[AnthropicTool], Field(max_length=128)] | None = None
    tool_choice: AnthropicToolChoice | None = Field(None, description="auto by default when tools are sent")


class _SamplingFields(Wire):
    max_tokens: Annotated[int, Field(ge=1, le=INT_MAX), INTEGRAL]
    stop_sequences: (
        Annotated[
            list[Annotated[str, Field(min_length=1)]],
            Field(max_length=MAX_STOPS),
            Says(f"must be a list of at most {MAX_STOPS} non-empty strings", beneath=True),
        ]
        | None
    ) = Field(None, description="Text that ends the answer, not included in it; the answer names the one it met")
    stream: bool | None = False
    temperature: Annotated[float, Field(ge=0, le=1)] | None = Field(None, description="0 is greedy; 1 by default")
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=1_000_000), INTEGRAL] | None = Field(None, description="0 means no cut")
    metadata: AnthropicMetadata | None = None


class AnthropicMessagesBody(_SamplingFields, _PromptFields):  # the prompt's fields first: checked in this order
    """The body of `/v1/messages`. A field not listed here is refused (400), among them thinking, service_tier,
    container and mcp_servers."""

    model_config = ConfigDict(title="AnthropicMessagesRequest")


class AnthropicCountTokensBody(_PromptFields):
    """The body of `/v1/messages/count_tokens`."""

    model_config = ConfigDict(title="AnthropicCountTokensRequest")


# ---- checked bodies as requests ------------------------------------------------------------------------------------


def _text(content: str | list[AnthropicTextBlock]) -> str:
    return content if isinstance(content, str) else "\n".join(block["text"] for block in content)


def _turn(i: int, m: AnthropicMessageParam, called: dict[str, str]) -> list[Message]:
    """One Anthropic message as the backends' messages; `called`: each tool_use id so far, with its tool's name."""
    role, content = m["role"], m["content"]
    if isinstance(content, str):
        return [Message(role, content)]
    texts: list[str] = []
    calls: list[ToolCall] = []
    results: list[Message] = []
    for j, block in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if block["type"] == "text":
            texts.append(block["text"])
        elif block["type"] == "tool_use":
            if role != "assistant":
                raise InvalidField(where, f"'{where}' is a tool_use block, which only assistant messages hold")
            calls.append(ToolCall(block["id"], block["name"], arguments_text(block["input"])))
            called[block["id"]] = block["name"]
        else:
            results.append(_result(where, block, role, called, bool(texts)))
    if role == "assistant":
        return [Message("assistant", "\n".join(texts), tool_calls=tuple(calls))]
    return results + ([Message("user", "\n".join(texts))] if texts or not results else [])


def _result(
    where: str, block: AnthropicToolResultBlock, role: str, called: dict[str, str], after_text: bool
) -> Message:
    if role != "user":
        raise InvalidField(where, f"'{where}' is a tool_result block, which only user messages hold")
    if after_text:
        raise InvalidField(where, f"'{where}' is a tool_result after text: a user message's tool results come first")
    call = block["tool_use_id"]
    if call not in called:
        param = f"{where}.tool_use_id"
        raise InvalidField(param, f"'{param}' {call!r} answers no tool_use block of an earlier message")
    text = _text(block.get("content", ""))
    return Message("tool", f"Error: {text}" if block.get("is_error") else text, tool_call_id=call, name=called[call])


def _conversation(wire: _PromptFields) -> tuple[Message, ...]:
    last = len(wire.messages) - 1
    if wire.messages[last]["role"] != "user":
        param = f"messages[{last}].role"
        raise InvalidField(param, f"'{param}' must be user: continuing an assistant's message is not supported")
    system = "" if wire.system is None else _text(wire.system)
    out = [Message("system", system)] if system else []
    called: dict[str, str] = {}
    for i, m in enumerate(wire.messages):
        out += _turn(i, m, called)
    return tuple(out)


def _tools(wire: _PromptFields) -> tuple[tuple[Tool, ...], ToolChoice]:
    """The tools and the choice, as the OpenAI door reads the same: its checks (a repeated name, a choice of a tool
    that is not there, a choice without tools) hold here word for word, for the same fields."""
    body: dict[str, Any] = {}
    if wire.tools is not None:
        body["tools"] = [{"type": "function", "function": _function(i, t)} for i, t in enumerate(wire.tools)]
    choice = wire.tool_choice
    if choice is not None:
        if (choice.type == "tool") != (choice.name is not None):
            says = "is required with type tool" if choice.name is None else "is only for type tool"
            raise InvalidField("tool_choice.name", f"'tool_choice.name' {says}")
        if choice.type == "none" and choice.disable_parallel_tool_use is not None:
            param = "tool_choice.disable_parallel_tool_use"
            raise InvalidField(param, f"'{param}' is only for type auto, any and tool")
        named = {"type": "function", "function": {"name": choice.name}}
        body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none", "tool": named}[choice.type]
        if choice.disable_parallel_tool_use is not None and wire.tools:
            body["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    return tools_of(validate(ToolFields, body), body)


def _function(i: int, tool: AnthropicTool) -> dict[str, Any]:
    """A tool as an OpenAI function, its keys in OpenAI's order (some prompts show them)."""
    if tool.input_schema.get("type") != "object":
        param = f"tools[{i}].input_schema"
        raise InvalidField(param, f'\'{param}\' must be a JSON Schema of an object: {{"type": "object", ...}}')
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = tool.input_schema
    if tool.strict is not None:
        function["strict"] = tool.strict
    return function


def parse_count(body: dict[str, Any]) -> AnthropicRequest:
    """Validate a `/v1/messages/count_tokens` body."""
    wire = validate(AnthropicCountTokensBody, body)
    tools, choice = _tools(wire)
    return AnthropicRequest(wire.model, _conversation(wire), tools, choice)


def parse_messages(body: dict[str, Any]) -> AnthropicRequest:
    """Validate a `/v1/messages` body."""
    wire = validate(AnthropicMessagesBody, body)
    tools, choice = _tools(wire)
    sampling = Sampling(
        temperature=wire.temperature,
        top_p=wire.top_p,
        top_k=wire.top_k,
        max_tokens=wire.max_tokens,
        stop=tuple(wire.stop_sequences or ()),
    )
    return AnthropicRequest(wire.model, _conversation(wire), tools, choice, sampling, bool(wire.stream))


BODIES: dict[str, type[BaseModel]] = {  # request bodies under their /openapi.json names
    "AnthropicMessagesRequest": AnthropicMessagesBody,
    "AnthropicCountTokensRequest": AnthropicCountTokensBody,
}
