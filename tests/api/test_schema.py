"""The request bodies /openapi.json publishes and the parser that checks them agree: on every numeric field's
boundaries (found by walking the published schemas, not a list kept here), on the security of each route, and on
the errors a client gets."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from api.anthropic_schema import parse_count, parse_messages
from api.completions_schema import parse_legacy_completion
from api.config import OPEN_PATHS
from api.ollama_schema import parse_chat as ollama_chat
from api.ollama_schema import parse_generate, parse_show
from api.openapi import build_spec
from api.schema import parse_chat, parse_completion
from api.tokens_schema import parse_detokenize, parse_tokenize
from backends.base import InvalidField

SPEC = build_spec(("m",))
SCHEMAS: dict[str, Any] = SPEC["components"]["schemas"]
# each request body: the smallest valid body, and its parser
HI = [{"role": "user", "content": "hi"}]
BODIES: dict[str, tuple[dict[str, Any], Callable[[dict[str, Any]], Any]]] = {
    "ChatRequest": ({"query": "q"}, parse_chat),
    "CompletionRequest": ({"messages": HI}, parse_completion),
    "LegacyCompletionRequest": ({"prompt": "p"}, parse_legacy_completion),
    "TokenizeRequest": ({"prompt": "p"}, parse_tokenize),
    "DetokenizeRequest": ({"tokens": [1]}, parse_detokenize),
    "AnthropicMessagesRequest": ({"model": "m", "max_tokens": 1, "messages": HI}, parse_messages),
    "AnthropicCountTokensRequest": ({"model": "m", "messages": HI}, parse_count),
    "OllamaChatRequest": ({"model": "m", "messages": HI}, ollama_chat),
    "OllamaGenerateRequest": ({"model": "m", "prompt": "p"}, parse_generate),
    "OllamaShowRequest": ({"model": "m"}, parse_show),
}
# numbers accepted without effect (best_of only as 1, Ollama's keep_alive): nothing of theirs reaches the backend
WITHOUT_EFFECT = frozenset({"best_of", "keep_alive"})
# what a numeric field needs beside it to be taken at all
COMPANIONS: dict[str, dict[str, Any]] = {"top_logprobs": {"logprobs": True}}
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
NOTES = ("title", "description", "default")  # keywords that do not constrain a value


def branches(prop: dict[str, Any]) -> list[dict[str, Any]]:
    return list(prop.get("anyOf", [prop]))


def numeric_fields() -> Iterator[tuple[str, str]]:
    for body in BODIES:
        for name, prop in SCHEMAS[body]["properties"].items():
            if any(b.get("type") in ("number", "integer") for b in branches(prop)):
                yield body, name


NUMERIC = list(numeric_fields())


def allows(schema: dict[str, Any], value: Any) -> bool:
    """Whether a JSON Schema (the subset numeric fields use) allows a value decoded from JSON."""
    if "anyOf" in schema:
        return any(allows(branch, value) for branch in schema["anyOf"])
    unknown = schema.keys() - {"type", "pattern", *BOUNDS, *NOTES}
    assert not unknown, f"this check does not read {unknown}: teach it, or it would pass what it cannot judge"
    kind = schema["type"]
    if kind == "null":
        return value is None
    if kind == "string":  # a field that takes a number or a string (keep_alive's "5m")
        return isinstance(value, str) and re.search(schema.get("pattern", ""), value) is not None
    assert kind in ("number", "integer"), kind
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False  # JSON Schema: true is not 1, "1" is not a number
    if isinstance(value, float) and not math.isfinite(value):
        return False  # not JSON at all (Python's json reads NaN and Infinity)
    if kind == "integer" and not (isinstance(value, int) or value.is_integer()):
        return False  # 3.0 is an integer to JSON Schema, 3.5 is not
    return (
        ("minimum" not in schema or value >= schema["minimum"])
        and ("maximum" not in schema or value <= schema["maximum"])
        and ("exclusiveMinimum" not in schema or value > schema["exclusiveMinimum"])
        and ("exclusiveMaximum" not in schema or value < schema["exclusiveMaximum"])
    )


def boundary_values(prop: dict[str, Any]) -> list[Any]:
    """Each bound itself, just inside and just outside it; integers also as floats, whole and not; numbers far past
    any bound (a bound only the parser keeps shows there); and what is not a number at all."""
    values: list[Any] = [None, True, False, "1", math.nan, math.inf, -math.inf, -(2**64), 2**64, -1e300, 1e300]
    for branch in branches(prop):
        for key in BOUNDS:
            if key not in branch:
                continue
            bound = branch[key]
            if branch["type"] == "integer":
                values += [bound - 1, bound, bound + 1, float(bound), bound - 0.5, bound + 0.5]
            else:
                values += [math.nextafter(bound, -math.inf), bound, float(bound), math.nextafter(bound, math.inf)]
    return values


def delivered(request: Any, field: str) -> Any:
    """Where a numeric field's value reaches the backend."""
    if field in ("max_length", "n"):
        return getattr(request, field)
    if field == "max_completion_tokens":
        return request.sampling.max_tokens
    if field == "top_logprobs":
        return request.sampling.logprobs
    return getattr(request.sampling, field)


def disagreements(body: str, field: str, prop: dict[str, Any]) -> list[str]:
    """The boundary values on which the parser and `prop` (the field's published schema) disagree."""
    base, parse = BODIES[body]
    wrong = []
    for value in boundary_values(prop):
        try:
            request = parse({**base, **COMPANIONS.get(field, {}), field: value})
        except InvalidField as exc:
            accepted = False
            assert exc.param == field and f"'{field}'" in exc.message, (value, exc.param, exc.message)
        else:
            accepted = True
            if value is not None and field not in WITHOUT_EFFECT:
                # what was accepted arrives as sent (top_k's 0 and -1 both mean no cut)
                assert delivered(request, field) == (max(value, 0) if field == "top_k" else value), value
        if accepted != allows(prop, value):
            wrong.append(f"{value!r}: parser {'accepts' if accepted else 'refuses'}, schema disagrees")
    return wrong


@pytest.mark.parametrize(("body", "field"), NUMERIC, ids=[f"{b}.{f}" for b, f in NUMERIC])
def test_the_parser_accepts_exactly_what_the_published_schema_allows(body: str, field: str) -> None:
    assert disagreements(body, field, SCHEMAS[body]["properties"][field]) == []


def test_every_number_a_client_sends_has_its_range_published() -> None:
    fields = {body: {f for b, f in NUMERIC if b == body} for body in BODIES}
    assert {"temperature", "top_p", "top_k", "seed", "max_tokens", "max_length"} <= fields["ChatRequest"]
    assert {"temperature", "top_p", "top_k", "seed", "max_tokens", "n"} <= fields["CompletionRequest"]
    for body, field in NUMERIC:
        if field in WITHOUT_EFFECT:
            continue
        (number,) = [b for b in branches(SCHEMAS[body]["properties"][field]) if b["type"] != "null"]
        assert number.keys() & {"minimum", "exclusiveMinimum"}, (body, field)
        assert number.keys() & {"maximum", "exclusiveMaximum"}, (body, field)  # top_k's ceiling was missing


def test_top_p_zero_is_accepted_and_published_as_allowed() -> None:
    (number, _) = branches(SCHEMAS["ChatRequest"]["properties"]["top_p"])
    assert number["minimum"] == 0 and "exclusiveMinimum" not in number
    assert parse_chat({"query": "q", "top_p": 0}).sampling.top_p == 0.0


def test_the_check_notices_a_bound_changed_in_one_place_only() -> None:
    # the drift this file guards against: the document refusing 0 for top_p while the parser takes it
    top_p = SCHEMAS["CompletionRequest"]["properties"]["top_p"]
    drifted = {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1}, {"type": "null"}]}
    assert top_p != drifted
    assert disagreements("CompletionRequest", "top_p", drifted) == [
        "0: parser accepts, schema disagrees",
        "0.0: parser accepts, schema disagrees",
    ]
    uncapped = {"anyOf": [{"type": "integer", "minimum": -1}, {"type": "null"}]}
    assert f"{2**64}: parser refuses, schema disagrees" in disagreements("ChatRequest", "top_k", uncapped)


def test_every_reference_resolves_in_the_published_components() -> None:
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            assert "$defs" not in node
            refs.extend([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(SPEC)
    assert refs
    for ref in refs:
        assert ref.removeprefix("#/components/schemas/") in SCHEMAS, ref
    bodies = [op["requestBody"] for ops in SPEC["paths"].values() for op in ops.values() if "requestBody" in op]
    assert {b["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1] for b in bodies} == set(BODIES)


def test_api_routes_ask_for_the_key_and_the_open_routes_do_not() -> None:
    either: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
    assert SPEC["security"] == either
    assert SPEC["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert SPEC["components"]["securitySchemes"]["apiKey"] == {
        **SPEC["components"]["securitySchemes"]["apiKey"],
        "in": "header",
        "name": "x-api-key",
    }
    for path, ops in SPEC["paths"].items():
        for op in ops.values():
            assert op.get("security", SPEC["security"]) == ([] if path in OPEN_PATHS else either), path
    assert OPEN_PATHS <= SPEC["paths"].keys()


MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("parse", "body", "param", "message"),
    [
        (parse_chat, {}, "query", "'query' is required"),
        (parse_chat, {"query": ""}, "query", "'query' must not be empty"),
        (
            parse_chat,
            {"query": "q", "temperature": 5},
            "temperature",
            "'temperature' must be at least 0 and at most 2, got 5",
        ),
        (
            parse_chat,
            {"query": "q", "repetition_penalty": 0},
            "repetition_penalty",
            "'repetition_penalty' must be greater than 0 and at most 10, got 0",
        ),
        (parse_chat, {"query": "q", "temperature": True}, "temperature", "'temperature' must be a finite number"),
        (parse_chat, {"query": "q", "top_k": 1.5}, "top_k", "'top_k' must be an integer"),
        (
            parse_chat,
            {"query": "q", "history": [["a", "b"], ["c"]]},
            "history",
            "'history[1]' must be a [user, assistant] pair of strings",
        ),
        (
            parse_chat,
            {"query": "q", "stop": ["a"] * 5},
            "stop",
            "'stop' must be a string or a list of at most 4 strings",
        ),
        (parse_completion, {"messages": MESSAGES, "n": 9}, "n", "'n' must be between 1 and 8, got 9"),
        (parse_completion, {"messages": []}, "messages", "'messages' must be a non-empty array"),
        (
            parse_completion,
            {"messages": [{"role": "robot", "content": "hi"}]},
            "messages[0].role",
            "'messages[0].role' must be 'system', 'developer', 'user', 'assistant', 'tool' or 'function'",
        ),
        (
            parse_completion,
            {"messages": [{"role": "user"}]},
            "messages[0].content",
            "'messages[0].content' is required",
        ),
        (
            parse_completion,
            {"messages": MESSAGES, "stream_options": {"include_usage": True}},
            "stream_options",
            "'stream_options' is only allowed when 'stream' is true",
        ),
        (
            parse_completion,
            {"messages": MESSAGES, "stream_options": []},
            "stream_options",
            "'stream_options' must be an object",
        ),
    ],
)
def test_a_refused_body_names_its_field_and_says_why(
    parse: Callable[[dict[str, Any]], Any], body: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(InvalidField) as info:
        parse(body)
    assert (info.value.param, info.value.message) == (param, message)


def test_unknown_fields_are_refused_and_text_parts_are_joined() -> None:
    chat = parse_chat({"query": "q", "history": [["a", "b"]], "stop": ["", "END"]})
    assert chat.query == "q" and chat.history == (("a", "b"),) and chat.sampling.stop == ("END",)
    with pytest.raises(InvalidField) as info:
        parse_chat({"query": "q", "frobnicate": {"x": 1}})
    assert info.value.param == "frobnicate" and "not a field this server implements" in info.value.message
    parts = [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story."}]
    done = parse_completion({"messages": [{"role": "developer", "content": parts}], "user": "u"})
    assert [(m.role, m.content) for m in done.messages] == [("system", "Tell me a story.")]
    assert (done.n, done.stream, done.include_usage, done.sampling.max_tokens) == (1, False, False, None)
    assert (done.logprobs, done.sampling.logprobs, done.sampling.logit_bias, done.sampling.constraint) == (
        False,
        None,
        (),
        None,
    )
