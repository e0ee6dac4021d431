"""The fields of `/v1/chat/completions` beyond sampling (response_format, structured_outputs, logprobs, top_logprobs,
logit_bias), and the rule behind them: nothing a client sends is silently ignored. A field this server does not
implement is a 400 naming it, on both doors; the few that SDKs send and that change nothing here are accepted; and
what the official `openai` SDK sends, by default and for structured output, is taken. Refusals are checked through
a real socket; what an accepted body becomes (the Sampling the engine gets) on the parser itself; logprobs in OpenAI's
shape on the formatting function and end to end from the tiny model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp import web
from pydantic import BaseModel

from api.openai_chat import logprobs_part
from api.openapi import build_spec
from api.schema import parse_completion
from backends.base import Constraint, InvalidField, TokenLogprob, TopLogprob
from tests.conftest import MakeClient
from tests.helpers import parse_frames

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
SCHEMA_TEXT = '{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"}}}'
SCHEMA_PARAM = "response_format.json_schema.schema"


def with_messages(fields: dict[str, Any]) -> dict[str, Any]:
    return {"messages": MESSAGES, **fields}


# ---- what an accepted body asks of the engine ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "constraint"),
    [
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, Constraint("json_object", "", "response_format")),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}},
            Constraint("json_schema", SCHEMA_TEXT, SCHEMA_PARAM),
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "schema": SCHEMA, "strict": True, "description": "a person"},
                }
            },
            Constraint("json_schema", SCHEMA_TEXT, SCHEMA_PARAM),
        ),
        ({"structured_outputs": {"json": SCHEMA}}, Constraint("json_schema", SCHEMA_TEXT, "structured_outputs.json")),
        (
            {"structured_outputs": {"json": json.dumps(SCHEMA, indent=2)}},
            Constraint("json_schema", SCHEMA_TEXT, "structured_outputs.json"),
        ),
        ({"structured_outputs": {"regex": r"\d{3}"}}, Constraint("regex", r"\d{3}", "structured_outputs.regex")),
        (
            {"structured_outputs": {"choice": ["yes", "no", "日本"]}},
            Constraint("choice", '["yes","no","日本"]', "structured_outputs.choice"),
        ),
        (
            {"structured_outputs": {"grammar": 'start: "a"+'}},
            Constraint("grammar", 'start: "a"+', "structured_outputs.grammar"),
        ),
        (
            {"structured_outputs": {"json_object": True}},
            Constraint("json_object", "", "structured_outputs.json_object"),
        ),
        (
            {"structured_outputs": {"regex": "a+", "json_object": False}},
            Constraint("regex", "a+", "structured_outputs.regex"),
        ),
        (
            {"response_format": {"type": "text"}, "structured_outputs": {"regex": "a+"}},
            Constraint("regex", "a+", "structured_outputs.regex"),
        ),
    ],
    ids=[
        "text",
        "json_object",
        "json_schema",
        "json_schema-all-fields",
        "so-json-object",
        "so-json-text",
        "so-regex",
        "so-choice",
        "so-grammar",
        "so-json_object",
        "so-json_object-false-asks-nothing",
        "text-format-beside-so",
    ],
)
def test_a_constraint_reaches_the_sampling_as_sent(fields: dict[str, Any], constraint: Constraint | None) -> None:
    assert parse_completion(with_messages(fields)).sampling.constraint == constraint


def test_a_schemas_key_order_is_kept() -> None:
    # the order of a schema's properties is the order the answer writes them in
    schema = {"type": "object", "properties": {"z": {}, "a": {}, "m": {}}}
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}}
    assert parse_completion(with_messages(body)).sampling.constraint == Constraint(
        "json_schema", '{"type":"object","properties":{"z":{},"a":{},"m":{}}}', SCHEMA_PARAM
    )


@pytest.mark.parametrize(
    ("fields", "asked", "logprobs"),
    [
        ({}, False, None),
        ({"logprobs": False}, False, None),
        ({"logprobs": False, "top_logprobs": None}, False, None),
        ({"logprobs": True}, True, 0),
        ({"logprobs": True, "top_logprobs": 0}, True, 0),
        ({"logprobs": True, "top_logprobs": 20}, True, 20),
        ({"logprobs": True, "top_logprobs": 3.0}, True, 3),
    ],
    ids=["unset", "false", "false-null-top", "true", "top-0", "top-20", "top-3.0"],
)
def test_logprobs_and_top_logprobs_become_the_samplings_logprobs(
    fields: dict[str, Any], asked: bool, logprobs: int | None
) -> None:
    request = parse_completion(with_messages(fields))
    assert (request.logprobs, request.sampling.logprobs) == (asked, logprobs)


def test_logit_bias_becomes_sorted_token_id_pairs() -> None:
    request = parse_completion(with_messages({"logit_bias": {"50256": -100, "7": 2.5, "0": 100, "12": 0}}))
    assert request.sampling.logit_bias == ((0, 100.0), (7, 2.5), (12, 0.0), (50256, -100.0))
    assert all(isinstance(bias, float) for _, bias in request.sampling.logit_bias)
    largest = {str(i): 1 for i in range(300)}  # OpenAI's limit, exactly
    assert len(parse_completion(with_messages({"logit_bias": largest})).sampling.logit_bias) == 300
    assert parse_completion(with_messages({"logit_bias": {}})).sampling.logit_bias == ()


# ---- refusals through the server, each naming its field -----------------------------------------------------------

JSON_SCHEMA_WITHOUT = {"type": "json_schema", "json_schema": {"name": "p"}}
LOGIT_BIAS_RULE = "'logit_bias' must map token ids"
UNIMPLEMENTED = "is not a field this server implements: it is refused rather than ignored"
REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, fields, param, what the message says)
    ("format-type", {"response_format": {"type": "xml"}}, "response_format.type", "must be 'text', 'json_object'"),
    ("format-not-object", {"response_format": "json"}, "response_format", "'response_format' must be an object"),
    ("format-no-type", {"response_format": {}}, "response_format.type", "'response_format.type' is required"),
    (
        "json_schema-missing",
        {"response_format": {"type": "json_schema"}},
        "response_format.json_schema",
        "'response_format.json_schema' is required",
    ),
    ("schema-missing", {"response_format": JSON_SCHEMA_WITHOUT}, SCHEMA_PARAM, f"'{SCHEMA_PARAM}' is required"),
    (
        "schema-not-object",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": "{}"}}},
        SCHEMA_PARAM,
        "must be an object",
    ),
    (
        "name-missing",
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
        "response_format.json_schema.name",
        "is required",
    ),
    (
        "strict-not-bool",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {}, "strict": "yes"}}},
        "response_format.json_schema.strict",
        "must be a boolean",
    ),
    (
        "json_schema-unknown-key",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {}, "extra": 1}}},
        "response_format.json_schema.extra",
        UNIMPLEMENTED,
    ),
    (
        "json_schema-with-other-type",
        {"response_format": {"type": "json_object", "json_schema": {"name": "p", "schema": {}}}},
        "response_format.json_schema",
        "is only for type json_schema",
    ),
    (
        "format-and-so",
        {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
        "structured_outputs",
        "cannot be sent with 'response_format' of type json_object",
    ),
    ("so-none", {"structured_outputs": {}}, "structured_outputs", "must hold exactly one of json, regex, choice"),
    (
        "so-only-false",
        {"structured_outputs": {"json_object": False}},
        "structured_outputs",
        "must hold exactly one of",
    ),
    (
        "so-several",
        {"structured_outputs": {"regex": "a", "choice": ["a"]}},
        "structured_outputs",
        "got regex and choice",
    ),
    ("so-not-object", {"structured_outputs": ["regex"]}, "structured_outputs", "must be an object"),
    ("so-json-number", {"structured_outputs": {"json": 5}}, "structured_outputs.json", "must be a JSON schema"),
    ("so-json-bad-text", {"structured_outputs": {"json": "{"}}, "structured_outputs.json", "is not valid JSON"),
    ("so-json-array-text", {"structured_outputs": {"json": "[1]"}}, "structured_outputs.json", "must be a JSON"),
    ("so-json-nan-text", {"structured_outputs": {"json": '{"a": NaN}'}}, "structured_outputs.json", "not valid JSON"),
    (
        "so-json-surrogate-text",
        {"structured_outputs": {"json": '{"a": "\\ud800"}'}},
        "structured_outputs.json",
        "unpaired UTF-16 surrogate",
    ),
    ("so-regex-empty", {"structured_outputs": {"regex": ""}}, "structured_outputs.regex", "must not be empty"),
    ("so-regex-number", {"structured_outputs": {"regex": 1}}, "structured_outputs.regex", "must be a string"),
    ("so-grammar-empty", {"structured_outputs": {"grammar": ""}}, "structured_outputs.grammar", "must not be empty"),
    ("so-choice-empty", {"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty array"),
    (
        "so-choice-empty-string",
        {"structured_outputs": {"choice": ["a", ""]}},
        "structured_outputs.choice",
        "non-empty strings",
    ),
    ("so-choice-number", {"structured_outputs": {"choice": ["a", 1]}}, "structured_outputs.choice", "strings"),
    (
        "so-json_object-string",
        {"structured_outputs": {"json_object": "true"}},
        "structured_outputs.json_object",
        "must be a boolean",
    ),
    (
        "so-unknown-key",
        {"structured_outputs": {"regex": "a", "whitespace_pattern": " "}},
        "structured_outputs.whitespace_pattern",
        UNIMPLEMENTED,
    ),
    ("logprobs-string", {"logprobs": "true"}, "logprobs", "'logprobs' must be a boolean"),
    ("top-without-logprobs", {"top_logprobs": 2}, "top_logprobs", "'top_logprobs' needs 'logprobs': true"),
    (
        "top-with-logprobs-false",
        {"logprobs": False, "top_logprobs": 0},
        "top_logprobs",
        "'top_logprobs' needs 'logprobs': true",
    ),
    ("top-21", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "must be between 0 and 20, got 21"),
    ("top-negative", {"logprobs": True, "top_logprobs": -1}, "top_logprobs", "must be between 0 and 20, got -1"),
    ("top-fraction", {"logprobs": True, "top_logprobs": 1.5}, "top_logprobs", "must be an integer"),
    ("bias-array", {"logit_bias": [[1, 2]]}, "logit_bias", LOGIT_BIAS_RULE),
    ("bias-word-key", {"logit_bias": {"hello": 1}}, "logit_bias", LOGIT_BIAS_RULE),
    ("bias-negative-key", {"logit_bias": {"-1": 1}}, "logit_bias", LOGIT_BIAS_RULE),
    ("bias-padded-key", {"logit_bias": {"07": 1}}, "logit_bias", LOGIT_BIAS_RULE),
    ("bias-too-high", {"logit_bias": {"7": 100.5}}, "logit_bias", LOGIT_BIAS_RULE),
    ("bias-too-low", {"logit_bias": {"7": -101}}, "logit_bias", LOGIT_BIAS_RULE),
    ("bias-string-value", {"logit_bias": {"7": "1"}}, "logit_bias", LOGIT_BIAS_RULE),
    ("bias-301", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
    ("store-true", {"store": True}, "store", "'store' must be false or null: this server stores no completions"),
    ("modalities-audio", {"modalities": ["text", "audio"]}, "modalities", 'must be ["text"]'),
    ("modalities-only-audio", {"modalities": ["audio"]}, "modalities", 'must be ["text"]'),
    ("metadata-number", {"metadata": {"k": 1}}, "metadata.k", "must be a string"),
    ("service_tier-number", {"service_tier": 1}, "service_tier", "must be a string"),
    ("stream_options-unknown", {"stream_options": {"obfuscate": True}}, "stream_options.obfuscate", UNIMPLEMENTED),
    ("unknown-field", {"frobnicate": 1}, "frobnicate", f"'frobnicate' {UNIMPLEMENTED}"),
    ("unknown-null", {"frobnicate": None}, "frobnicate", UNIMPLEMENTED),
    ("chatglm-field", {"query": "hi"}, "query", UNIMPLEMENTED),
    ("tool_choice-without-tools", {"tool_choice": "none"}, "tool_choice", "only allowed when 'tools' are sent"),
    ("function_call-alone", {"function_call": "auto"}, "function_call", "only allowed when 'functions' are sent"),
    ("tools-object", {"tools": {}}, "tools", "must be an array"),
    ("tools-unknown-type", {"tools": [{"type": "code", "function": {"name": "f"}}]}, "tools[0].type", "must be"),
    (
        "tool-name-spaces",
        {"tools": [{"type": "function", "function": {"name": "a b"}}]},
        "tools[0].function.name",
        "is not valid",
    ),
    (
        "tool-unknown-field",
        {"tools": [{"type": "function", "function": {"name": "f", "x": 1}}]},
        "tools[0].function.x",
        UNIMPLEMENTED,
    ),
    ("tools-and-functions", {"tools": [], "functions": []}, "functions", "cannot be sent with 'tools'"),
    (
        "tool_choice-unknown-name",
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        "tool_choice",
        "not among the 'tools'",
    ),
    (
        "tool_choice-word",
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "always"},
        "tool_choice",
        'must be "none", "auto", "required"',
    ),
    ("parallel_tool_calls-string", {"parallel_tool_calls": "yes"}, "parallel_tool_calls", "must be a boolean"),
    (
        "tool-message-without-id",
        {"messages": [{"role": "tool", "content": "22"}]},
        "messages[0].tool_call_id",
        "is required for tool messages",
    ),
    (
        "user-with-tool_calls",
        {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        "messages[0].tool_calls",
        "only for assistant messages",
    ),
    ("audio", {"audio": {"voice": "alloy", "format": "wav"}}, "audio", "not supported: this server answers in text"),
    ("prediction", {"prediction": {"type": "content", "content": "x"}}, "prediction", "is not supported"),
    ("reasoning_effort", {"reasoning_effort": "low"}, "reasoning_effort", "is not supported"),
    ("web_search_options", {"web_search_options": {}}, "web_search_options", "is not supported"),
    ("verbosity", {"verbosity": "low"}, "verbosity", "is not supported"),
    ("guided_json", {"guided_json": SCHEMA}, "guided_json", "send structured_outputs"),
    ("guided_regex", {"guided_regex": "a+"}, "guided_regex", "send structured_outputs"),
]


@pytest.mark.parametrize(("fields", "param", "says"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
async def test_every_refused_field_is_a_400_that_names_it(
    fields: dict[str, Any], param: str, says: str, make_client: MakeClient
) -> None:
    client = await make_client()
    resp = await client.post("/v1/chat/completions", json=with_messages(fields))
    error = (await resp.json())["error"]
    assert (resp.status, error["param"], error["type"]) == (400, param, "invalid_request_error"), error
    assert says in error["message"] and f"'{param}'" in error["message"], error["message"]


async def test_a_field_nobody_implements_carries_openais_code(make_client: MakeClient) -> None:
    client = await make_client()
    for fields in ({"prediction": {"type": "content", "content": "x"}}, {"frobnicate": 1}):
        error = (await (await client.post("/v1/chat/completions", json=with_messages(fields))).json())["error"]
        assert error["code"] == "unsupported_parameter", error


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "user", "content": "hi", "name": "ada"}, "messages[0].name"),
        ({"role": "assistant", "content": "hi", "audio": {"id": "a"}}, "messages[0].audio"),
        ({"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}, "messages[0].content"),
    ],
    ids=["name", "audio", "part-key"],
)
async def test_an_unknown_key_in_a_message_is_a_400_naming_it(
    message: dict[str, Any], param: str, make_client: MakeClient
) -> None:
    client = await make_client()
    resp = await client.post("/v1/chat/completions", json={"messages": [message]})
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == param and f"'{param}'" in error["message"], error


@pytest.mark.parametrize("route", ["/chat", "/stream"])
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": "hi"}, "prompt"),  # the original ChatGLM-6B api.py's name for the query
        ({"logprobs": True}, "logprobs"),  # an OpenAI field: not on this door
        ({"messages": MESSAGES}, "messages"),
        ({"do_sample": None}, "do_sample"),
    ],
    ids=["prompt", "logprobs", "messages", "null-value"],
)
async def test_the_chatglm_door_names_an_unknown_field_too(
    route: str, fields: dict[str, Any], param: str, make_client: MakeClient
) -> None:
    client = await make_client()
    resp = await client.post(route, json={"query": "hi", **fields})
    body = await resp.json()
    assert resp.status == 400 and body["success"] is False
    assert body["error"]["param"] == param and f"'{param}' {UNIMPLEMENTED}" == body["error"]["message"]
    # its own fields still work as they did
    answer = await client.post(route, json={"query": "hi", "max_length": 200, "max_tokens": 2, "history": []})
    assert answer.status == 200
    await answer.read()


# ---- accepted, without effect -------------------------------------------------------------------------------------

NO_EFFECT = {
    "user": "user-1",
    "store": False,
    "metadata": {"team": "docs"},
    "service_tier": "auto",
    "prompt_cache_key": "conversation-9",
    "safety_identifier": "hash-of-user",
    "modalities": ["text"],
}


async def test_fields_without_effect_are_accepted_and_change_nothing(make_client: MakeClient) -> None:
    client = await make_client()
    plain = with_messages({"temperature": 0, "max_tokens": 6, "ignore_eos": True})
    answers = []
    for body in (plain, {**plain, **NO_EFFECT}, {**plain, **{k: None for k in NO_EFFECT}}):
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200, await resp.text()
        answers.append((await resp.json())["choices"][0]["message"]["content"])
    assert answers[1] == answers[0] == answers[2]


def test_the_published_schema_documents_every_field_and_allows_no_other() -> None:
    schemas = build_spec(("m",))["components"]["schemas"]
    completion = schemas["CompletionRequest"]
    fields = {"response_format", "structured_outputs", "logprobs", "top_logprobs", "logit_bias", *NO_EFFECT}
    assert fields <= completion["properties"].keys()
    assert {"tools", "tool_choice", "parallel_tool_calls", "functions", "function_call"} <= completion[
        "properties"
    ].keys()
    assert not {"audio", "prediction"} & completion["properties"].keys()
    assert "audio" in completion["description"]  # refused, and the document says so
    for name in ("CompletionRequest", "ChatRequest", "ChatMessage", "TextPart", "StreamOptions", "ResponseFormat"):
        assert schemas[name]["additionalProperties"] is False, name
    for name in ("JsonSchemaFormat", "StructuredOutputs"):
        assert schemas[name]["additionalProperties"] is False, name
    for name in ("user", "metadata", "service_tier", "safety_identifier"):
        assert "without effect" in completion["properties"][name]["description"], name
    assert schemas["JsonSchemaFormat"]["required"] == ["name", "schema"]
    bias = completion["properties"]["logit_bias"]["anyOf"][0]
    assert bias["maxProperties"] == 300 and bias["additionalProperties"] is False
    (values,) = bias["patternProperties"].values()
    assert (values["minimum"], values["maximum"]) == (-100, 100)


# ---- what the official SDK sends ----------------------------------------------------------------------------------


class Person(BaseModel):
    name: str
    age: int


class Recorder:
    """An OpenAI-compatible stand-in that notes each body the SDK sends and answers a fixed completion."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        head = {"id": "chatcmpl-1", "created": 0, "model": body["model"]}
        content = '{"name": "Ada", "age": 36}'
        if not body.get("stream"):
            message = {"role": "assistant", "content": content}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            return web.json_response({**head, "object": "chat.completion", "choices": [choice]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta, reason in (({"role": "assistant", "content": content}, None), ({}, "stop")):
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            chunk = {**head, "object": "chat.completion.chunk", "choices": [choice]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest.fixture
async def recorded(aiohttp_client: Any) -> AsyncIterator[list[dict[str, Any]]]:
    """The bodies the SDK sends for plain, streamed and structured (`parse`, `stream` with a response_format)
    requests, as an OpenAI-compatible server receives them."""
    recorder = Recorder()
    server = await aiohttp_client(recorder.app())
    async with openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="k", max_retries=0) as sdk:
        await sdk.chat.completions.create(model="m", messages=MESSAGES)
        async for _ in await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True):
            pass
        parsed = await sdk.beta.chat.completions.parse(model="m", messages=MESSAGES, response_format=Person)
        assert parsed.choices[0].message.parsed == Person(name="Ada", age=36)
        async with sdk.chat.completions.stream(model="m", messages=MESSAGES, response_format=Person) as stream:
            async for _ in stream:
                pass
    yield recorder.bodies


def test_what_the_sdk_sends_is_what_this_server_reads(recorded: list[dict[str, Any]]) -> None:
    plain, streamed, parsed, parsed_stream = recorded
    assert plain == {"model": "m", "messages": MESSAGES}  # nothing added by default: nothing to refuse
    assert streamed == {**plain, "stream": True}
    schema = Person.model_json_schema() | {"additionalProperties": False}
    form = {"type": "json_schema", "json_schema": {"schema": schema, "name": "Person", "strict": True}}
    assert parsed == {**plain, "stream": False, "response_format": form}
    assert parsed_stream == {**parsed, "stream": True}
    constraint = parse_completion(parsed).sampling.constraint
    assert constraint is not None and constraint.kind == "json_schema" and json.loads(constraint.source) == schema


async def test_the_sdks_bodies_are_accepted_by_the_server(
    recorded: list[dict[str, Any]], make_client: MakeClient
) -> None:
    client = await make_client(served_model_names=("m",))
    for body in recorded:
        resp = await client.post("/v1/chat/completions", json=body)  # as the SDK sent it
        text = await resp.text()
        assert resp.status == 200, (body, text)
        if body.get("stream"):
            assert parse_frames(text.encode())[-1] == (None, "[DONE]")
        else:
            (choice,) = json.loads(text)["choices"]
            assert choice["message"]["role"] == "assistant"
            if "response_format" in body and choice["finish_reason"] == "stop":  # held to the schema, not ignored
                Person.model_validate_json(choice["message"]["content"])


async def test_the_sdk_talks_to_the_server_and_sends_its_answer_back(make_client: MakeClient) -> None:
    client = await make_client(served_model_names=("tiny",))
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="k", max_retries=0) as sdk:
        done = await sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
        assert done.choices[0].logprobs is None
        # the answer's message object, sent back as the next turn's history, holds no field the server refuses
        turn: list[Any] = [*MESSAGES, done.choices[0].message, {"role": "user", "content": "more"}]
        again = await sdk.chat.completions.create(model="tiny", messages=turn, max_tokens=4)
        assert again.choices[0].message.role == "assistant"
        with pytest.raises(openai.BadRequestError) as info:  # this model's chat template does not render tools
            await sdk.chat.completions.create(
                model="tiny",
                messages=MESSAGES,
                tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            )
        assert info.value.param == "tools" and "no tool-call format" in str(info.value.message)


# ---- logprobs in OpenAI's shape -----------------------------------------------------------------------------------


def test_logprobs_take_openais_shape() -> None:
    # "é" split over two tokens: each carries its own bytes, the text shows where they join
    tokens = (
        TokenLogprob(
            "Caf", -0.25, (67, 97, 102), (TopLogprob("Caf", -0.25, (67, 97, 102)), TopLogprob("C", -2.0, (67,)))
        ),
        TokenLogprob("\\xc3", -0.5, (0xC3,), ()),
        TokenLogprob("\\xa9", -1e-05, (0xA9,), (TopLogprob("\\xa9", -1e-05, (0xA9,)),)),
    )
    assert logprobs_part(tokens) == {
        "content": [
            {
                "token": "Caf",
                "logprob": -0.25,
                "bytes": [67, 97, 102],
                "top_logprobs": [
                    {"token": "Caf", "logprob": -0.25, "bytes": [67, 97, 102]},
                    {"token": "C", "logprob": -2.0, "bytes": [67]},
                ],
            },
            {"token": "\\xc3", "logprob": -0.5, "bytes": [0xC3], "top_logprobs": []},
            {
                "token": "\\xa9",
                "logprob": -1e-05,
                "bytes": [0xA9],
                "top_logprobs": [{"token": "\\xa9", "logprob": -1e-05, "bytes": [0xA9]}],
            },
        ],
        "refusal": None,
    }
    assert bytes(b for entry in logprobs_part(tokens)["content"] for b in entry["bytes"]).decode() == "Café"
    assert logprobs_part(()) == {"content": [], "refusal": None}


async def test_the_local_models_logprobs_reach_the_client_in_openais_shape(make_client: MakeClient) -> None:
    client = await make_client()
    body = with_messages({"logprobs": True, "top_logprobs": 2, "max_tokens": 12, "temperature": 0})
    done = await (await client.post("/v1/chat/completions", json=body)).json()
    (choice,) = done["choices"]
    entries = choice["logprobs"]["content"]
    # one entry per token but an end-of-sequence one
    assert 0 < len(entries) <= done["usage"]["completion_tokens"] and choice["logprobs"]["refusal"] is None
    # the tokens' bytes join to the answer (the random model writes bytes that are no UTF-8: U+FFFD in the text)
    assert bytes(b for e in entries for b in e["bytes"]).decode(errors="replace") == choice["message"]["content"]
    for e in entries:
        assert e.keys() == {"token", "logprob", "bytes", "top_logprobs"} and e["logprob"] <= 0
        assert len(e["top_logprobs"]) == 2 and all(t.keys() == {"token", "logprob", "bytes"} for t in e["top_logprobs"])
    streamed = await (await client.post("/v1/chat/completions", json={**body, "stream": True})).read()
    chunks = [json.loads(data)["choices"][0] for _, data in parse_frames(streamed)[:-1]]
    # content chunks (one may be empty: the entries of a last token with no text of its own, a special one)
    texts = [c for c in chunks if "content" in c["delta"] and c["delta"].get("role") is None]
    assert all(c["logprobs"] is None for c in chunks if c not in texts)  # the role and the finish reason
    assert [e for c in texts for e in c["logprobs"]["content"]] == entries  # greedy: the same tokens, chunk by chunk


async def test_logprob_bytes_join_to_the_answer_also_across_special_and_odd_byte_tokens(
    make_client: MakeClient,
) -> None:
    """Sampled answers of the random model hold special tokens (`<|im_start|>`, which the text leaves out: their
    entries have no bytes, and their name as token) and the byte 0xFF (which llguidance reads back as nothing)."""
    client = await make_client()
    specials = 0
    for seed in range(20):
        body = with_messages({"logprobs": True, "max_tokens": 40, "temperature": 1.0, "seed": seed})
        (choice,) = (await (await client.post("/v1/chat/completions", json=body)).json())["choices"]
        entries = choice["logprobs"]["content"]
        assert bytes(b for e in entries for b in e["bytes"]).decode(errors="replace") == choice["message"]["content"]
        specials += sum(e["token"].startswith("<|") and not e["bytes"] for e in entries)
    assert specials  # the case this is about did come up


def test_a_tool_result_must_answer_a_call_made_before_it() -> None:
    user: dict[str, Any] = {"role": "user", "content": "hi"}
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    asked: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
    ok = parse_completion({"messages": [user, asked, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]})
    assert ok.messages[2].tool_call_id == "call_1"
    cases: list[list[dict[str, Any]]] = [
        [user, asked, {"role": "tool", "tool_call_id": "call_2", "content": "x"}],  # no such call
        [user, {"role": "tool", "tool_call_id": "call_1", "content": "x"}, asked],  # answered before it was made
    ]
    for messages in cases:
        with pytest.raises(InvalidField) as info:
            parse_completion({"messages": messages})
        at = next(i for i, m in enumerate(messages) if m["role"] == "tool")
        assert info.value.param == f"messages[{at}].tool_call_id"
        assert "answers no tool call of an earlier message" in info.value.message
