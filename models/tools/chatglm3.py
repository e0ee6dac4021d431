"""ChatGLM3-6B: tools in the system turn as a pretty-printed JSON list after one English sentence; a call is the
segment `name\\n` and a fenced ```python block holding `tool_call(key=literal, ...)`, read here without ever
evaluating it: only keyword arguments whose values are literals make a call (spec glm-tools.md, section 2)."""

from __future__ import annotations

import ast
import json
import keyword
from collections.abc import Sequence
from typing import Any

from models.tools.base import CallStream, SegmentCalls, Tool, json_arguments
from models.tools.grammar import json_rule, one_of, split_defs

NAME = "chatglm3"
SENTENCE = "Answer the following questions as best as you can. You have access to the following tools:"
FENCE = "```"
# JSON's own words, which a model trained on JSON schemas may write inside a call: read as Python's
_JSON_WORDS = {"true": True, "false": False, "null": None}


def system_turn(tools: Sequence[Tool]) -> str:
    """The tools' system content: the tools as flat function objects, as the model card and its training data have
    them (the official OpenAI demo dumps the wrapped form; docs/tools.md says why not)."""
    listed = json.dumps([tool.function() for tool in tools], indent=4, ensure_ascii=False)
    return f"{SENTENCE}\n{listed}"


def call_body(arguments: Any) -> str:
    """A call in the history, written back the way the model writes it: Python literals (single-quoted strings,
    True/False/None)."""
    if not isinstance(arguments, dict):
        raise ValueError("a ChatGLM3 call's arguments must be a JSON object")
    keywords = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    return f"{FENCE}python\ntool_call({keywords})\n{FENCE}"


def parse_body(name: str, body: str) -> str | None:
    """A call's arguments as JSON text, or None: the body must be one fence, one `tool_call(...)` expression with
    keyword arguments only, each a literal."""
    lines = body.strip().split("\n")
    if len(lines) < 3 or not lines[0].strip().startswith(FENCE) or lines[-1].strip() != FENCE:
        return None
    try:
        tree = ast.parse("\n".join(lines[1:-1]).strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        return None
    if call.args or any(k.arg is None for k in call.keywords):  # positional or **kwargs: not the format
        return None
    arguments: dict[str, Any] = {}
    for given in call.keywords:
        try:
            arguments[str(given.arg)] = ast.literal_eval(_json_words(given.value))
        except (ValueError, TypeError, SyntaxError, RecursionError):
            return None
    return json_arguments(arguments)


def _json_words(node: ast.expr) -> ast.expr:
    """The value with `true`, `false` and `null` as the constants they mean; every other name stays a name, which
    literal_eval refuses."""

    class Words(ast.NodeTransformer):
        def visit_Name(self, name: ast.Name) -> ast.AST:
            if name.id in _JSON_WORDS:
                return ast.copy_location(ast.Constant(_JSON_WORDS[name.id]), name)
            return name

    return Words().visit(node)  # type: ignore[no-any-return]


def _keywords(tool: Tool) -> str:
    """The call's arguments, forced: with a strict schema each property `key=` and a JSON value held to its own
    schema (JSON values are Python literals, true/false/null read as such), required ones first; else any keywords
    with JSON values."""
    schema = tool.schema()
    properties = schema.get("properties")
    if not tool.strict or not isinstance(properties, dict) or schema.get("type") != "object":
        # any keywords, each a JSON value (Python reads those as literals, true/false/null aside, which the parser
        # takes): a greedy `[^\n]*` would swallow the closing parenthesis
        item = f'/[A-Za-z_][A-Za-z0-9_]*/ "=" {json_rule({})}'
        return f'({item} (", " {item})*)?'
    if bad := [k for k in properties if not k.isidentifier() or keyword.iskeyword(k)]:
        raise ValueError(f"{tool.name}'s parameter {bad[0]!r} cannot be a Python keyword argument")
    required = [k for k in schema.get("required", []) if k in properties]
    optional = [k for k in properties if k not in required]
    defs = split_defs(schema)[1]  # each value's schema stands alone: it carries the definitions it refers to
    items = [f"{json.dumps(f'{k}=')} {json_rule({**properties[k], **defs})}" for k in (*required, *optional)]
    if not items:
        return '""'
    parts = [items[0] if required else f"({items[0]})?"]
    for k, item in zip((*required, *optional)[1:], items[1:], strict=True):
        parts.append(f'", " {item}' if k in required else f'(", " {item})?')
    return " ".join(parts)


class ChatGLM3Format:
    name = NAME
    markers: tuple[str, ...] = ()  # its calls are plain text between role tokens

    def __init__(self, assistant: int) -> None:
        self.assistant = assistant

    def calls(self, tools: Sequence[Tool]) -> CallStream:
        return SegmentCalls([t.name for t in tools], parse_body, self.assistant)

    def forced(self, tools: Sequence[Tool]) -> str:
        # SentencePiece writes a word's leading space itself: the name and the fence may start with one
        head = f'"{FENCE}python\\ntool_call("'
        return one_of([f'" "? {json.dumps(t.name + chr(10))} " "? {head} {_keywords(t)} ")\\n{FENCE}"' for t in tools])
