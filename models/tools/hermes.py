"""Hermes and Qwen2.5 templates: each call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in the
answer's text; the chat template renders the tools."""

from __future__ import annotations

import json
from collections.abc import Sequence

from models.tools.base import CallStream, MarkerCalls, Tool, ToolCall, call_of, loads
from models.tools.grammar import json_rule, one_of, split_defs

NAME = "hermes"
OPEN, CLOSE = "<tool_call>", "</tool_call>"


def parse_markup(markup: str) -> list[tuple[str, str]] | None:
    try:
        found = call_of(loads(markup.strip()), ("arguments", "parameters"))
    except ValueError:
        return None
    return None if found is None else [found]


def system_prompt(tools: Sequence[Tool]) -> str:
    """For a template that does not render tools itself (`--tool-call-parser hermes`): Hermes' own instructions."""
    listed = "\n".join(json.dumps({"type": "function", "function": t.function()}, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f"{OPEN}{CLOSE} XML tags:\n{OPEN}\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n'
        f"{CLOSE}"
    )


class HermesFormat:
    name = NAME
    markers: tuple[str, ...] = (OPEN, CLOSE)

    def calls(self, tools: Sequence[Tool]) -> CallStream:
        return MarkerCalls(OPEN, CLOSE, parse_markup, [t.name for t in tools])

    def forced(self, tools: Sequence[Tool]) -> str:
        return one_of([f'"{OPEN}\\n" {json_rule(call_schema(t, "arguments"))} "\\n{CLOSE}"' for t in tools])

    def system_prompt(self, tools: Sequence[Tool]) -> str:
        return system_prompt(tools)

    def render_calls(self, calls: Sequence[ToolCall]) -> str:
        """Calls in the history, as the model writes them (for a template that does not render calls)."""
        return "\n".join(
            f"{OPEN}\n{json.dumps({'name': c.name, 'arguments': c.argument_object()}, ensure_ascii=False)}\n{CLOSE}"
            for c in calls
        )


def call_schema(tool: Tool, arguments: str) -> dict[str, object]:
    """A call as one JSON object: the tool's name, then its arguments under `arguments`. The schema's definitions
    move to the top, where its `#/$defs/...` references point."""
    schema, defs = split_defs(tool.schema())
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, arguments: schema},
        "required": ["name", arguments],
        "additionalProperties": False,
        **defs,
    }
