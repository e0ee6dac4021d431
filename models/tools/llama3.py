"""Llama 3.1 and later: a call is the whole answer, one JSON object `{"name": ..., "parameters": {...}}`
(after `<|python_tag|>` when the model writes one); the chat template renders the tools."""

from __future__ import annotations

import json
from collections.abc import Sequence

from models.tools.base import Calls, CallStream, Pieces, Tool, ToolCall, call_of, loads
from models.tools.grammar import json_rule, one_of
from models.tools.hermes import call_schema

NAME = "llama3_json"
TAG = "<|python_tag|>"


def parse_markup(markup: str) -> list[tuple[str, str]] | None:
    try:
        found = call_of(loads(markup.strip().removeprefix(TAG).strip()), ("parameters", "arguments"))
    except ValueError:
        return None
    return None if found is None else [found]


class JsonAnswerCalls:
    """The call is the whole answer: an answer that starts with `{` (or the python tag) is held to its end and
    read then; any other streams as text."""

    boundary: int | None = None

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)
        self._calls = Calls()
        self._pending = ""
        self._mode = "head"  # head | text | call

    @property
    def called(self) -> bool:
        return self._calls.count > 0

    def push(self, text: str) -> Pieces:
        if self._mode == "text":
            return Pieces(text)
        self._pending += text
        if self._mode == "call":
            return Pieces()
        head = self._pending.lstrip()
        if not head or (TAG.startswith(head) and head != TAG):
            return Pieces()  # nothing yet, or what could still be the python tag
        if head.startswith(("{", TAG)):
            self._mode = "call"
            return Pieces()
        self._mode = "text"
        pending, self._pending = self._pending, ""
        return Pieces(pending)

    def segment(self) -> Pieces:
        return Pieces()

    def flush(self, cut: bool = False) -> Pieces:  # an answer of JSON that is no call is text, cut or not
        pending, self._pending = self._pending, ""
        calls = self._calls.emit_all(parse_markup(pending), self.names) if self._mode == "call" else None
        return Pieces(pending) if calls is None else Pieces(calls=calls)


class Llama3Format:
    name = NAME
    markers: tuple[str, ...] = (TAG,)

    def calls(self, tools: Sequence[Tool]) -> CallStream:
        return JsonAnswerCalls([t.name for t in tools])

    def forced(self, tools: Sequence[Tool]) -> str:
        return one_of([json_rule(call_schema(t, "parameters")) for t in tools])

    def system_prompt(self, tools: Sequence[Tool]) -> str:
        listed = "\n\n".join(json.dumps({"type": "function", "function": t.function()}) for t in tools)
        return (
            "Given the following functions, please respond with a JSON for a function call with its proper "
            'arguments that best answers the given prompt.\n\nRespond in the format {"name": function name, '
            '"parameters": dictionary of argument name and its value}. Do not use variables.\n\n' + listed
        )

    def render_calls(self, calls: Sequence[ToolCall]) -> str:
        return "\n".join(json.dumps({"name": c.name, "parameters": c.argument_object()}) for c in calls)
