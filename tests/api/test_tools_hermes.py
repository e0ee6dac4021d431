"""OpenAI tool calling end to end on a Hugging Face model whose chat template renders tools (Hermes / Qwen2.5
style): a tiny model is taught a few answers (calls, text, a malformed call) on the exact prompts the server builds,
then the server's answers are read through raw HTTP, raw SSE, the official `openai` SDK and LangChain."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from api.schema import parse_completion
from models.loader import LoadedModel
from tests.conftest import MakeClient, build_tiny_model
from tests.helpers import chunk_deltas, completion_chunks
from tests.training import hermes_model, taught

Client = TestClient[web.Request, web.Application]

# short definitions: each prompt's tokens cost the teaching time
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}},
}
TOOLS: list[Any] = [WEATHER, TIME]


def strict(name: str, key: str) -> dict[str, Any]:
    """A strict tool whose one argument is short: a forced call's arguments are held to it."""
    parameters = {
        "type": "object",
        "properties": {key: {"type": "string", "maxLength": 10}},
        "required": [key],
        "additionalProperties": False,
    }
    return {"type": "function", "function": {"name": name, "parameters": parameters, "strict": True}}


STRICT_TOOLS = [strict("get_weather", "city"), strict("get_time", "zone")]

W_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
T_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
BROKEN = '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>'
UNKNOWN = '<tool_call>\n{"name": "launch_rocket", "arguments": {"target": "Moon"}}\n</tool_call>'
ANSWER = "It is 22 degrees."
HELLO = "Hello there."
RESULT = '{"temperature": 22}'

ASK: dict[str, Any] = {"role": "user", "content": "What is the weather in Paris?"}


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def after_call(call_id: str) -> list[dict[str, Any]]:
    """The conversation once the model called get_weather and the tool answered."""
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    return [
        ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": RESULT},
    ]


# The bodies the tests send (less the sampling fields) and the answer the model is taught for each
WEATHER_BODY = {"messages": [ASK], "tools": TOOLS}
AGENT_BODY = {"messages": after_call("call_1"), "tools": TOOLS}
TWO_BODY = {"messages": user("Weather in Paris and the time in UTC?"), "tools": TOOLS}
BROKEN_BODY = {"messages": user("Break the call."), "tools": TOOLS}
UNKNOWN_BODY = {"messages": user("Launch a rocket."), "tools": TOOLS}
CHAT_BODY = {"messages": user("Just chat."), "tools": STRICT_TOOLS}
NO_TOOLS_BODY = {"messages": [ASK]}  # what tool_choice "none" prompts: the tools stay out
ONE_TOOL_BODY = {"messages": [ASK], "tools": [WEATHER]}  # LangChain's bound tool; a named choice of get_weather
LESSONS: list[tuple[dict[str, Any], str]] = [
    (WEATHER_BODY, W_CALL),
    (AGENT_BODY, ANSWER),
    (TWO_BODY, f"{W_CALL}\n{T_CALL}"),
    (BROKEN_BODY, BROKEN),
    (UNKNOWN_BODY, UNKNOWN),
    (CHAT_BODY, HELLO),
    (NO_TOOLS_BODY, W_CALL),  # without tools in its prompt it still writes the markup: "none" must not read it
    (ONE_TOOL_BODY, W_CALL),
]
CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")
URL = "/v1/chat/completions"


@pytest.fixture(scope="module")
def hermes_lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny model with the Hermes template, taught the LESSONS on the prompts the server builds for them."""
    lm = hermes_model(build_tiny_model(tmp_path_factory.mktemp("hermes"), context=1024))
    (eos,) = lm.eos_token_ids
    examples = []
    for body, answer in LESSONS:
        req = parse_completion({**body, "model": "x"})
        prompt = lm.chat.encode(req.messages, req.tools)
        continuation = [*lm.tokenizer.encode(answer, add_special_tokens=False), eos]
        assert len(prompt) + len(continuation) < min(lm.context_length, len(prompt) + 200)  # within max_tokens 200
        examples.append((prompt, continuation))
    return taught(lm, examples, steps=40, rounds=6)


async def post(client: Client, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    resp = await client.post(URL, json={**body, "temperature": 0, "max_tokens": 200, **extra})
    answer = await resp.json()
    assert resp.status == 200, answer
    return dict(answer)


async def stream(client: Client, body: dict[str, Any], **extra: Any) -> list[dict[str, Any]]:
    """The chunks of a streamed answer, read from the raw event stream."""
    resp = await client.post(URL, json={**body, "temperature": 0, "max_tokens": 200, "stream": True, **extra})
    assert resp.status == 200, await resp.text()
    return completion_chunks(await resp.read())


deltas = chunk_deltas


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(d.get("content") or "" for d in deltas(chunks))


def streamed_calls(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The calls the deltas make, checked for OpenAI's shape: a call's first delta has its index, id, type and
    name; the ones after only add to its arguments."""
    calls: list[dict[str, Any]] = []
    for d in deltas(chunks):
        for piece in d.get("tool_calls") or []:
            if "id" in piece:
                assert piece["index"] == len(calls) and piece["type"] == "function", piece
                assert CALL_ID.fullmatch(piece["id"]) and "name" in piece["function"], piece
                calls.append({"id": piece["id"], "name": piece["function"]["name"], "arguments": ""})
            else:
                assert piece["index"] == len(calls) - 1 and "name" not in piece["function"], piece
            calls[piece["index"]]["arguments"] += piece["function"]["arguments"]
    return calls


def finish(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]


def only_choice(answer: dict[str, Any]) -> tuple[dict[str, Any], str]:
    (choice,) = answer["choices"]
    return choice["message"], choice["finish_reason"]


def sdk_args(lm: LoadedModel) -> dict[str, Any]:
    return {"model": lm.name, "messages": [ASK], "tools": TOOLS, "temperature": 0, "max_tokens": 200}


def call_of(call: dict[str, Any]) -> tuple[str, Any]:
    assert call["type"] == "function" and CALL_ID.fullmatch(call["id"]), call
    return call["function"]["name"], json.loads(call["function"]["arguments"])


# ---- a call, read out of the answer ---------------------------------------------------------------------------


async def test_a_call_comes_back_parsed(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    client = await make_client(hermes_lm)
    message, reason = only_choice(await post(client, WEATHER_BODY))
    assert reason == "tool_calls"
    assert message["content"] is None and "function_call" not in message
    assert [call_of(c) for c in message["tool_calls"]] == [("get_weather", {"city": "Paris"})]


async def test_each_choice_reads_its_own_calls(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    client = await make_client(hermes_lm)
    answer = await post(client, WEATHER_BODY, n=2)
    assert [c["finish_reason"] for c in answer["choices"]] == ["tool_calls"] * 2
    calls = [c["message"]["tool_calls"] for c in answer["choices"]]
    assert [[call_of(call) for call in choice] for choice in calls] == [[("get_weather", {"city": "Paris"})]] * 2
    assert calls[0][0]["id"] != calls[1][0]["id"]


async def test_a_call_through_the_sdk(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    url = str((await make_client(hermes_lm)).make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as sdk:
        done = await sdk.chat.completions.create(**sdk_args(hermes_lm))
    (choice,) = done.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and CALL_ID.fullmatch(call.id)
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


async def test_a_call_streamed_through_the_sdk(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    url = str((await make_client(hermes_lm)).make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as sdk:
        chunks = [c async for c in await sdk.chat.completions.create(**sdk_args(hermes_lm), stream=True)]
    pieces = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    first, *rest = pieces
    assert first.index == 0 and first.type == "function" and first.id and CALL_ID.fullmatch(first.id)
    assert first.function is not None and first.function.name == "get_weather"
    assert all(p.index == 0 and p.id is None and p.function and p.function.name is None for p in rest)
    arguments = "".join(p.function.arguments or "" for p in pieces if p.function)
    assert json.loads(arguments) == {"city": "Paris"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


@pytest.mark.parametrize(
    ("body", "text", "calls"),
    [
        (WEATHER_BODY, "", [("get_weather", {"city": "Paris"})]),
        (TWO_BODY, "", [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]),
        (CHAT_BODY, HELLO, []),
        ({"messages": after_call("call_1"), "tools": TOOLS}, ANSWER, []),
    ],
    ids=["call", "two calls", "text", "text after a result"],
)
async def test_raw_stream_never_shows_markup(
    body: dict[str, Any], text: str, calls: list[Any], make_client: MakeClient, hermes_lm: LoadedModel
) -> None:
    """No content delta holds call markup or a held-back piece of it; a text answer's deltas join to the text the
    non-streamed answer has."""
    client = await make_client(hermes_lm)
    chunks = await stream(client, body)
    contents = [d["content"] for d in deltas(chunks) if d.get("content")]
    assert not any("<tool_call>" in c or "</tool_call>" in c or "<" in c for c in contents), contents
    assert streamed_text(chunks) == text
    assert len(contents) >= (2 if text else 0)  # text streams as it comes, not at the end in one piece
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed_calls(chunks)] == calls
    assert finish(chunks) == ["tool_calls" if calls else "stop"]
    message, reason = only_choice(await post(client, body))
    assert (message["content"] or "") == text and reason == finish(chunks)[0]
    assert [call_of(c) for c in message.get("tool_calls") or []] == calls


# ---- the agent loop: call, result, answer ------------------------------------------------------------------------


async def test_agent_loop_through_the_sdk(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    """The SDK user's loop: the answer's message goes back as it came, then the tool's result with its call's id."""
    url = str((await make_client(hermes_lm)).make_url("/v1"))
    messages: list[Any] = [ASK]
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as sdk:
        args: dict[str, Any] = {"model": hermes_lm.name, "tools": TOOLS, "temperature": 0, "max_tokens": 200}
        first = (await sdk.chat.completions.create(messages=messages, **args)).choices[0]
        assert first.finish_reason == "tool_calls"
        (call,) = first.message.tool_calls or []
        messages += [first.message, {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
        second = (await sdk.chat.completions.create(messages=messages, **args)).choices[0]
    assert second.finish_reason == "stop" and second.message.content == ANSWER and not second.message.tool_calls


async def test_agent_loop_streamed(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    client = await make_client(hermes_lm)
    (call,) = streamed_calls(await stream(client, WEATHER_BODY))
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    chunks = await stream(client, {"messages": after_call(call["id"]), "tools": TOOLS})
    assert streamed_text(chunks) == ANSWER and streamed_calls(chunks) == [] and finish(chunks) == ["stop"]


# ---- what the request allows ----------------------------------------------------------------------------------


async def test_two_calls_have_index_0_and_1(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    client = await make_client(hermes_lm)
    message, reason = only_choice(await post(client, TWO_BODY))
    assert reason == "tool_calls" and message["content"] is None
    calls = [call_of(c) for c in message["tool_calls"]]
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]
    assert len({c["id"] for c in message["tool_calls"]}) == 2
    pieces = [p for d in deltas(await stream(client, TWO_BODY)) for p in d.get("tool_calls") or []]
    assert sorted({p["index"] for p in pieces}) == [0, 1]


async def test_parallel_tool_calls_false_gives_one_call(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    client = await make_client(hermes_lm)
    message, reason = only_choice(await post(client, TWO_BODY, parallel_tool_calls=False))
    assert reason == "tool_calls" and message["content"] is None
    assert [call_of(c) for c in message["tool_calls"]] == [("get_weather", {"city": "Paris"})]
    chunks = await stream(client, TWO_BODY, parallel_tool_calls=False)
    assert [c["name"] for c in streamed_calls(chunks)] == ["get_weather"] and streamed_text(chunks) == ""


async def test_tool_choice_none_reads_no_calls(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    """The tools stay out of the prompt and the answer is text, even when the model writes call markup."""
    client = await make_client(hermes_lm)
    answer = await post(client, WEATHER_BODY, tool_choice="none")
    message, reason = only_choice(answer)
    assert reason == "stop" and "tool_calls" not in message and message["content"] == W_CALL
    auto = await post(client, WEATHER_BODY)
    assert answer["usage"]["prompt_tokens"] < auto["usage"]["prompt_tokens"]  # no tools in the prompt
    chunks = await stream(client, WEATHER_BODY, tool_choice="none")
    assert streamed_text(chunks) == W_CALL and streamed_calls(chunks) == [] and finish(chunks) == ["stop"]


@pytest.mark.parametrize(("body", "raw"), [(BROKEN_BODY, BROKEN), (UNKNOWN_BODY, UNKNOWN)], ids=["json", "name"])
async def test_a_malformed_call_is_text(
    body: dict[str, Any], raw: str, make_client: MakeClient, hermes_lm: LoadedModel
) -> None:
    client = await make_client(hermes_lm)
    message, reason = only_choice(await post(client, body))
    assert reason == "stop" and message["content"] == raw and "tool_calls" not in message
    chunks = await stream(client, body)
    assert streamed_text(chunks) == raw and streamed_calls(chunks) == [] and finish(chunks) == ["stop"]


async def test_forced_calls(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    """A prompt the model answers with text gets a call when one is required or named: the grammar makes it, and
    a strict tool's arguments keep to its schema."""
    client = await make_client(hermes_lm)
    message, reason = only_choice(await post(client, CHAT_BODY))
    assert (message["content"], reason) == (HELLO, "stop")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in STRICT_TOOLS}
    choices: list[Any] = ["required", {"type": "function", "function": {"name": "get_time"}}]
    for choice in choices:
        message, reason = only_choice(await post(client, CHAT_BODY, tool_choice=choice))
        assert reason == "tool_calls" and message["content"] is None, message
        (call,) = message["tool_calls"]
        name, arguments = call_of(call)
        jsonschema.validate(arguments, schemas[name])
        if isinstance(choice, dict):
            assert name == "get_time"
        chunks = await stream(client, CHAT_BODY, tool_choice=choice)
        assert streamed_text(chunks) == "" and finish(chunks) == ["tool_calls"]
        (streamed,) = streamed_calls(chunks)
        assert (streamed["name"], json.loads(streamed["arguments"])) == (name, arguments)


async def test_legacy_functions_answer_with_function_call(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    client = await make_client(hermes_lm)
    functions = [t["function"] for t in TOOLS]
    for function_call, body in [
        ("auto", {"messages": [ASK], "functions": functions}),
        ({"name": "get_weather"}, {"messages": [ASK], "functions": functions}),
    ]:
        message, reason = only_choice(await post(client, body, function_call=function_call))
        assert reason == "function_call" and message["content"] is None and "tool_calls" not in message
        assert message["function_call"]["name"] == "get_weather"
        arguments = json.loads(message["function_call"]["arguments"])
        # a named function is forced (compact JSON, which the model was not taught): an object, whatever its keys
        assert arguments == {"city": "Paris"} if function_call == "auto" else isinstance(arguments, dict)
    chunks = await stream(client, {"messages": [ASK], "functions": functions})
    pieces = [d["function_call"] for d in deltas(chunks) if "function_call" in d]
    assert pieces[0]["name"] == "get_weather" and all("tool_calls" not in d for d in deltas(chunks))
    assert json.loads("".join(p["arguments"] for p in pieces)) == {"city": "Paris"}
    assert finish(chunks) == ["function_call"]


async def test_legacy_functions_carry_one_call(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    """`function_call` holds one call: an answer with two gives its first, streamed or not."""
    client = await make_client(hermes_lm)
    body = {"messages": TWO_BODY["messages"], "functions": [t["function"] for t in TOOLS]}
    message, reason = only_choice(await post(client, body))
    assert reason == "function_call" and message["function_call"]["name"] == "get_weather"
    assert json.loads(message["function_call"]["arguments"]) == {"city": "Paris"}
    chunks = await stream(client, body)
    pieces = [d["function_call"] for d in deltas(chunks) if "function_call" in d]
    assert [p["name"] for p in pieces if "name" in p] == ["get_weather"]
    assert json.loads("".join(p["arguments"] for p in pieces)) == {"city": "Paris"}


# ---- LangChain ---------------------------------------------------------------------------------------------------


async def test_langchain_bind_tools(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    from langchain_core.messages import AIMessage, AIMessageChunk
    from langchain_openai import ChatOpenAI

    url = str((await make_client(hermes_lm)).make_url("/v1"))
    question = [("user", ASK["content"])]
    async with httpx.AsyncClient() as http:  # closed here, not left to LangChain's shared client
        key = SecretStr("x")
        chat = ChatOpenAI(base_url=url, api_key=key, model=hermes_lm.name, temperature=0, http_async_client=http)
        bound = chat.bind_tools([WEATHER])
        answer = await bound.ainvoke(question)
        chunks = [chunk async for chunk in bound.astream(question)]
    assert isinstance(answer, AIMessage)
    assert [(c["name"], c["args"]) for c in answer.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert answer.tool_calls[0]["id"] and CALL_ID.fullmatch(answer.tool_calls[0]["id"])
    whole: AIMessageChunk | None = None
    for chunk in chunks:
        assert isinstance(chunk, AIMessageChunk)
        whole = chunk if whole is None else whole + chunk
    assert whole is not None and not whole.content
    assert [(c["name"], c["args"]) for c in whole.tool_calls] == [("get_weather", {"city": "Paris"})]


# ---- a model whose template ignores tools, and the requests refused --------------------------------------------


async def test_a_model_without_a_tool_format_refuses_tools(make_client: MakeClient) -> None:
    client = await make_client()  # the conftest tiny model: its template ignores tools
    resp = await client.post(URL, json={"messages": [ASK], "tools": TOOLS, "max_tokens": 4})
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == "tools" and "'tools'" in error["message"], error
    resp = await client.post(URL, json={"messages": [ASK], "tools": TOOLS, "tool_choice": "none", "max_tokens": 4})
    assert resp.status == 200, await resp.text()
    message, _ = only_choice(await resp.json())
    assert "tool_calls" not in message


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "functions": [WEATHER["function"]]}, "functions"),
        ({"functions": [WEATHER["function"]], "function_call": {"name": "nope"}}, "function_call"),
        ({"messages": [ASK, {"role": "tool", "content": RESULT}], "tools": TOOLS}, "messages[1].tool_call_id"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ],
    ids=[
        "unknown name",
        "choice without tools",
        "tools and functions",
        "unknown function",
        "result without id",
        "forced call and response_format",
    ],
)
async def test_bad_tool_requests_are_400(
    extra: dict[str, Any], param: str, make_client: MakeClient, hermes_lm: LoadedModel
) -> None:
    client = await make_client(hermes_lm)
    resp = await client.post(URL, json={"messages": [ASK], "max_tokens": 4, **extra})
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == param and f"'{param}'" in error["message"], error


def test_the_taught_prompts_are_the_ones_served(hermes_lm: LoadedModel) -> None:
    """The prompt renders the tools and the calls of the history as the template writes them."""
    req = parse_completion({**AGENT_BODY, "model": "x"})
    text = hermes_lm.tokenizer.decode(hermes_lm.chat.encode(req.messages, req.tools))
    assert '{"name": "get_weather", "parameters":' in text and '"name": "get_time"' in text
    assert text.endswith(
        f"<|im_start|>assistant\n{W_CALL}<|im_end|>\n<|im_start|>user\n<tool_response>\n{RESULT}\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
