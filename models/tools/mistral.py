"""Mistral: the calls follow `[TOOL_CALLS]` as one JSON list `[{"name": ..., "arguments": {...}}, ...]` to the
end of the answer; the chat template renders the tools."""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Sequence

from models.tools.base import CallStream, MarkerCalls, Tool, ToolCall, call_of, loads
from models.tools.grammar import json_rule, one_of
from models.tools.hermes import call_schema

NAME = "mistral"
MARKER = "[TOOL_CALLS]"


def mistral_id() -> str:
    """Mistral's templates take only ids of nine letters or digits: the next turn hands them back."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def parse_markup(markup: str) -> list[tuple[str, str]] | None:
    try:
        calls = loads(markup.strip())
    except ValueError:
        return None
    calls = calls if isinstance(calls, list) else [calls]
    out: list[tuple[str, str]] = []
    for call in calls:
        if (found := call_of(call, ("arguments",))) is None:
            return None
        out.append(found)
    return out or None


class MistralFormat:
    name = NAME
    markers: tuple[str, ...] = (MARKER,)

    def calls(self, tools: Sequence[Tool]) -> CallStream:
        return MarkerCalls(MARKER, None, parse_markup, [t.name for t in tools], mistral_id)

    def forced(self, tools: Sequence[Tool]) -> str:
        return one_of([f'"{MARKER}[" {json_rule(call_schema(t, "arguments"))} "]"' for t in tools])

    def system_prompt(self, tools: Sequence[Tool]) -> str:
        listed = json.dumps([{"type": "function", "function": t.function()} for t in tools], ensure_ascii=False)
        return f"[AVAILABLE_TOOLS]{listed}[/AVAILABLE_TOOLS]"

    def render_calls(self, calls: Sequence[ToolCall]) -> str:
        listed = [{"name": c.name, "arguments": c.argument_object()} for c in calls]
        return MARKER + json.dumps(listed, ensure_ascii=False)
