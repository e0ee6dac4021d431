"""Mistral: the calls follow `[TOOL_CALLS]` as one JSON list `[{"name": ..., "arguments": {...}}, ...]` to the
end of the answer; the chat template renders the tools."""

from __future__ import annotations

import json
from collections.abc import Sequence

from models.tools.base import CallStream, MarkerCalls, Tool, json_arguments
from models.tools.grammar import json_rule, one_of
from models.tools.hermes import call_schema

NAME = "mistral"
MARKER = "[TOOL_CALLS]"


def parse_markup(markup: str) -> list[tuple[str, str]] | None:
    try:
        calls = json.loads(markup.strip())
    except ValueError:
        return None
    calls = calls if isinstance(calls, list) else [calls]
    out: list[tuple[str, str]] = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(name := call.get("name"), str):
            return None
        if (arguments := json_arguments(call.get("arguments", {}))) is None:
            return None
        out.append((name, arguments))
    return out or None


class MistralFormat:
    name = NAME
    markers: tuple[str, ...] = (MARKER,)

    def calls(self, tools: Sequence[Tool]) -> CallStream:
        return MarkerCalls(MARKER, None, parse_markup, [t.name for t in tools])

    def forced(self, tools: Sequence[Tool]) -> str:
        return one_of([f'"{MARKER}[" {json_rule(call_schema(t, "arguments"))} "]"' for t in tools])

    def system_prompt(self, tools: Sequence[Tool]) -> str:
        listed = json.dumps([{"type": "function", "function": t.function()} for t in tools], ensure_ascii=False)
        return f"[AVAILABLE_TOOLS]{listed}[/AVAILABLE_TOOLS]"
