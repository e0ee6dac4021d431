"""The tool fields of an OpenAI body: the functions the model may call (`tools`, or the legacy `functions`) and the
choice among them, checked into the backends' `Tool`s and `ToolChoice`. A function's name is defined here, for a
message's call (api/messages.py) names a function as a tool defines it."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from pydantic import Field

from api.wire import Says, Wire, compact
from backends.base import InvalidField, Tool, ToolChoice

log = logging.getLogger(__name__)

FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionDefinition(Wire):
    name: FunctionName = Field(description="Letters, digits, _ and -, at most 64")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema of the arguments")
    strict: bool | None = Field(None, description="A forced call's arguments are held to `parameters`")


class ToolDefinition(Wire):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Wire):
    name: FunctionName


class NamedToolChoice(Wire):
    type: Literal["function"]
    function: NamedFunction


class ToolFields(Wire):
    """Tools the model may call (and the legacy `functions` spelling of the same)."""

    tools: Annotated[list[ToolDefinition], Field(max_length=128)] | None = None
    tool_choice: (
        Annotated[
            Literal["none", "auto", "required"] | NamedToolChoice,
            Says('must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'),
        ]
        | None
    ) = Field(None, description="auto by default when tools are sent; required and a named function are enforced")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per answer")
    functions: Annotated[list[FunctionDefinition], Field(max_length=128)] | None = Field(
        None, description="Legacy: tools as bare functions; answers carry `function_call`"
    )
    function_call: (
        Annotated[
            Literal["none", "auto"] | NamedFunction,
            Says('must be "none", "auto" or {"name": ...}'),
        ]
        | None
    ) = Field(None, description="Legacy tool_choice")


def tools_of(wire: ToolFields, body: dict[str, Any]) -> tuple[tuple[Tool, ...], ToolChoice]:
    """The tools and the choice among them; the legacy `functions` and `function_call` map onto the same."""
    if wire.tools is not None and wire.functions is not None:
        raise InvalidField("functions", "'functions' cannot be sent with 'tools'")
    for other in ("tool_choice", "tools"):
        if wire.function_call is not None and getattr(wire, other) is not None:
            raise InvalidField("function_call", f"'function_call' cannot be sent with '{other}'")
    legacy = wire.functions is not None or wire.function_call is not None
    name_of = "functions" if legacy else "tools"
    sent = body.get(name_of) or []
    raw = [entry if legacy else entry["function"] for entry in sent]  # as sent: key order shows in some prompts
    defined = wire.functions if legacy else [t.function for t in wire.tools or ()]
    tools: list[Tool] = []
    for i, (fn, spec) in enumerate(zip(defined or (), raw, strict=True)):
        if any(t.name == fn.name for t in tools):
            raise InvalidField(f"{name_of}[{i}]", f"'{name_of}[{i}]' repeats the name {fn.name!r}")
        parameters = None if fn.parameters is None else compact(fn.parameters)
        tools.append(Tool(fn.name, json.dumps(spec, ensure_ascii=False), parameters, bool(fn.strict)))
    if wire.parallel_tool_calls is not None and not tools:
        raise InvalidField("parallel_tool_calls", "'parallel_tool_calls' is only allowed when 'tools' are sent")
    choice_field = "function_call" if legacy else "tool_choice"
    choice = wire.function_call if legacy else wire.tool_choice
    # a legacy answer holds one function_call
    parallel = wire.parallel_tool_calls is not False and not legacy
    if choice is None:
        return tuple(tools), ToolChoice("auto" if tools else "none", parallel=parallel)
    if not tools:
        raise InvalidField(choice_field, f"'{choice_field}' is only allowed when '{name_of}' are sent")
    if isinstance(choice, str):
        return tuple(tools), ToolChoice(choice, parallel=parallel)
    name = choice.function.name if isinstance(choice, NamedToolChoice) else choice.name
    if all(t.name != name for t in tools):
        raise InvalidField(choice_field, f"'{choice_field}' names {name!r}, which is not among the '{name_of}'")
    return tuple(tools), ToolChoice("function", name, parallel)


def arguments_text(arguments: Any) -> str:
    """A call's arguments sent as an object (Anthropic's `input`, Ollama's `arguments`) as the JSON text a model's
    call holds: spaced as `json.dumps` spaces it, as the models write their calls, so a history reads the same from
    every door."""
    return json.dumps(arguments, ensure_ascii=False)


def arguments_object(text: str) -> dict[str, Any]:
    """A call's arguments text as the object the Anthropic and Ollama doors answer with; an empty text is no
    arguments. Backends send objects; another value (an upstream's broken call) becomes {} rather than a value those
    clients cannot read."""
    try:
        value = json.loads(text) if text else {}
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        log.warning("a call's arguments are not a JSON object: %.200s", text)
        return {}
    return value
