"""Anthropic Messages (`/v1/messages`, `/v1/messages/count_tokens`), driven by the official `anthropic` SDK and raw
HTTP: answers compared with the streamed ones and with the OpenAI door's on the same prompt, errors in Anthropic's
shape, tool use end to end on a tiny model taught one call, and the door over an --upstream server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import strategies as st

from api.anthropic_schema import parse_messages
from api.config import BACKEND
from models.loader import LoadedModel
from tests.api.test_tools_hermes import W_CALL
from tests.conftest import LiveServer, MakeClient, build_tiny_model
from tests.helpers import fuzz, parse_frames, wait_until
from tests.training import hermes_model, taught

Client = TestClient[web.Request, web.Application]

URL = "/v1/messages"
COUNT = "/v1/messages/count_tokens"
ASK = "Tell me a story."
SYSTEM = "Be brief."
GREEDY = {"temperature": 0}


_OPENED: list[anthropic.Anthropic] = []


@pytest.fixture(scope="module", autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    """The SDK clients the tests open, closed once the module is done (left to the collector, their sockets would
    warn in whichever test happens to run then)."""
    yield
    while _OPENED:
        _OPENED.pop().close()


def sdk(server: LiveServer, **kwargs: Any) -> anthropic.Anthropic:
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, **kwargs)
    _OPENED.append(client)
    return client


def create(server: LiveServer, **kwargs: Any) -> Any:
    """A greedy answer to ASK through the SDK (this SDK sends no temperature of its own: it goes as an extra)."""
    args: dict[str, Any] = {
        "model": "claude-any-name",
        "max_tokens": 24,
        "messages": [{"role": "user", "content": ASK}],
    }
    return sdk(server).messages.create(**{**args, **kwargs}, extra_body=GREEDY)


def text_of(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def error_of(status: int, body: Any, kind: str) -> str:
    """The message of an error in Anthropic's shape (nothing else in it), of the status and type expected."""
    assert isinstance(body, dict) and body.keys() == {"type", "error"}, body
    assert body["type"] == "error" and body["error"].keys() == {"type", "message"}, body
    assert (status, body["error"]["type"]) == (status, kind), body
    return str(body["error"]["message"])


# ---- answers through the SDK ---------------------------------------------------------------------------------------


def test_an_answer_through_the_sdk(tiny_server: LiveServer) -> None:
    done = create(tiny_server)
    assert done.type == "message" and done.role == "assistant" and done.id.startswith("msg_")
    assert done.model == "claude-any-name"  # any name is served, and echoed
    assert done.stop_reason in ("end_turn", "max_tokens") and done.stop_sequence is None
    assert all(block.type == "text" for block in done.content) and len(done.content) <= 1
    assert 0 < done.usage.output_tokens <= 24 and done.usage.input_tokens > 0


def test_the_streamed_answer_is_the_answer(tiny_server: LiveServer) -> None:
    done = create(tiny_server)
    args: dict[str, Any] = {
        "model": "claude-any-name",
        "max_tokens": 24,
        "messages": [{"role": "user", "content": ASK}],
    }
    with sdk(tiny_server).messages.stream(**args, extra_body=GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == text_of(final) == text_of(done)
    assert len(pieces) > 1  # streamed as it came, not in one piece at the end
    assert (final.stop_reason, final.stop_sequence) == (done.stop_reason, done.stop_sequence)
    assert final.usage.input_tokens == done.usage.input_tokens
    assert final.usage.output_tokens == done.usage.output_tokens
    assert final.model == "claude-any-name" and len(final.content) == len(done.content)
    events = list(sdk(tiny_server).messages.create(**args, stream=True, extra_body=GREEDY))
    deltas = [e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"]
    assert "".join(deltas) == text_of(done)


@pytest.mark.parametrize(
    ("system", "content"),
    [
        (SYSTEM, ASK),
        ([{"type": "text", "text": SYSTEM}], ASK),
        (SYSTEM, [{"type": "text", "text": ASK}]),
        ([{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}], [{"type": "text", "text": ASK}]),
    ],
    ids=["strings", "system-blocks", "content-blocks", "blocks-joined-by-newline"],
)
def test_strings_and_text_blocks_are_one_prompt(tiny_server: LiveServer, system: Any, content: Any) -> None:
    """Each spelling gives the answer /v1/chat/completions gives the same conversation (the last case is the
    system "Be\\nbrief.": blocks join with a newline)."""
    done = create(tiny_server, system=system, messages=[{"role": "user", "content": content}])
    joined = SYSTEM if isinstance(system, str) or len(system) == 1 else "Be\nbrief."
    openai_messages = [{"role": "system", "content": joined}, {"role": "user", "content": ASK}]
    chat = tiny_server.post("/v1/chat/completions", {"messages": openai_messages, "max_tokens": 24, **GREEDY})
    assert text_of(done) == chat["choices"][0]["message"]["content"]
    assert done.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert done.usage.output_tokens == chat["usage"]["completion_tokens"]


def test_a_stop_sequence_ends_the_answer_and_is_named(tiny_server: LiveServer) -> None:
    whole = text_of(create(tiny_server))
    at = next(i for i in range(4, len(whole) - 2) if whole.find(whole[i : i + 2]) == i and whole[i : i + 2].strip())
    stop = whole[at : at + 2]  # a piece of the greedy answer where it first occurs
    done = create(tiny_server, stop_sequences=[stop])
    assert done.stop_reason == "stop_sequence" and done.stop_sequence == stop
    assert text_of(done) == whole[:at]
    args: dict[str, Any] = {"model": "m", "max_tokens": 24, "messages": [{"role": "user", "content": ASK}]}
    with sdk(tiny_server).messages.stream(**args, stop_sequences=[stop], extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence, text_of(final)) == ("stop_sequence", stop, whole[:at])


def test_max_tokens_ends_the_answer(tiny_server: LiveServer) -> None:
    done = create(tiny_server, max_tokens=2)
    assert done.stop_reason == "max_tokens" and done.usage.output_tokens == 2


@pytest.mark.parametrize("system", [None, SYSTEM], ids=["no-system", "system"])
def test_count_tokens_is_the_answer_s_input_tokens(tiny_server: LiveServer, system: str | None) -> None:
    extra: dict[str, Any] = {} if system is None else {"system": system}
    messages: Any = [{"role": "user", "content": ASK}]
    count = sdk(tiny_server).messages.count_tokens(model="any", messages=messages, **extra)
    assert count.input_tokens == create(tiny_server, messages=messages, **extra).usage.input_tokens


# ---- the raw stream ------------------------------------------------------------------------------------------------


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of each frame; every frame is named, and its data's type is its name."""
    frames = [(name, json.loads(data)) for name, data in parse_frames(raw)]
    assert all(name is not None and data["type"] == name for name, data in frames), frames
    return [(str(name), data) for name, data in frames]


def shape(frames: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The frames' names, a run of content_block_delta as one."""
    names = [name for name, _ in frames]
    return [n for i, n in enumerate(names) if not (n == "content_block_delta" and names[i - 1] == n)]


async def test_raw_event_sequence(make_client: MakeClient) -> None:
    client = await make_client()
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": ASK}], "stream": True, **GREEDY}
    resp = await client.post(URL, json=body, headers={"anthropic-version": "2023-06-01"})
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    frames = events(await resp.read())
    assert shape(frames) == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = frames[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["model"] == "m"
    assert frames[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    text = "".join(d["delta"]["text"] for n, d in frames if n == "content_block_delta")
    whole = await (await client.post(URL, json={**body, "stream": False})).json()
    assert whole["content"] == [{"type": "text", "text": text}]
    end = frames[-2][1]
    assert end["delta"] == {"stop_reason": whole["stop_reason"], "stop_sequence": None}
    assert end["usage"] == whole["usage"]
    # a local model knows its prompt's length from the start, as Anthropic's message_start says it
    assert start["usage"] == {"input_tokens": whole["usage"]["input_tokens"], "output_tokens": 0}


async def test_disconnecting_mid_stream_stops_the_generation(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    client = await make_client(slow_lm)  # 200 tokens take over 4 s: only a cancellation ends them within 2 s
    engine = client.app[BACKEND]
    body = {"model": "m", "max_tokens": 200, "messages": [{"role": "user", "content": ASK}], "stream": True, **GREEDY}
    resp = await client.post(URL, json=body)
    for _ in range(3):  # message_start, ping, the first block
        await resp.content.readuntil(b"\n\n")
    assert engine.counts[0] == 1
    resp.close()
    await wait_until(lambda: engine.counts == (0, 0), within=2.0)


async def test_a_quiet_backend_sends_ping_events(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    """Keep-alives are Anthropic's `ping` events (every step of the slow model outlasts the keep-alive here); the SDK
    skips them, and its message is the whole answer's."""
    client = await make_client(slow_lm, keepalive=0.005)
    body: dict[str, Any] = {"model": "m", "max_tokens": 6, "messages": [{"role": "user", "content": ASK}]}
    resp = await client.post(URL, json={**body, "stream": True, **GREEDY})
    frames = events(await resp.read())
    pings = [data for name, data in frames if name == "ping"]
    assert len(pings) > 1 and all(p == {"type": "ping"} for p in pings)
    assert shape([f for f in frames if f[0] != "ping"])[0] == "message_start" and frames[-1][0] == "message_stop"
    async with anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key="x", max_retries=0) as sdk_client:
        async with sdk_client.messages.stream(**body, extra_body=GREEDY) as stream:
            final = await stream.get_final_message()
    whole = await (await client.post(URL, json={**body, **GREEDY})).json()
    assert [{"type": "text", "text": text_of(final)}] == whole["content"]


async def test_a_failure_mid_stream_is_an_error_event(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    """The server stops while answering: the stream's last event is an `error` in Anthropic's shape, no
    message_stop; the SDK raises it."""
    client = await make_client(slow_lm)
    body = {"model": "m", "max_tokens": 200, "messages": [{"role": "user", "content": ASK}], "stream": True, **GREEDY}
    resp = await client.post(URL, json=body)
    head = b"".join([await resp.content.readuntil(b"\n\n") for _ in range(3)])
    await client.app[BACKEND].stop(0.1)
    frames = events(head + await resp.read())
    name, data = frames[-1]
    assert name == "error" and "message_stop" not in [n for n, _ in frames], frames[-3:]
    assert data["error"]["type"] == "overloaded_error" and "shutting down" in data["error"]["message"]


# ---- errors in Anthropic's shape -----------------------------------------------------------------------------------


async def test_the_api_key_as_x_api_key(make_client: MakeClient) -> None:
    client = await make_client(api_key="sekrit")
    body = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": ASK}]}
    assert (await client.post(URL, json=body, headers={"x-api-key": "sekrit"})).status == 200
    wrong = await client.post(URL, json=body, headers={"x-api-key": "wrong"})
    assert "API key" in error_of(wrong.status, await wrong.json(), "authentication_error") and wrong.status == 401
    async with anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key="wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await bad.messages.count_tokens(model="m", messages=[{"role": "user", "content": ASK}])
    assert refused.value.status_code == 401
    async with anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key="sekrit", max_retries=0) as good:
        assert (await good.messages.count_tokens(model="m", messages=[{"role": "user", "content": ASK}])).input_tokens


def test_the_model_list_reads_in_both_sdks(tiny_server: LiveServer) -> None:
    """GET /v1/models answers in a shape the Anthropic SDK reads as its own, and the OpenAI SDK still as its own."""
    import openai

    (model,) = sdk(tiny_server).models.list().data
    assert (model.type, model.display_name) == ("model", model.id) and model.created_at.year >= 2026
    with openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused") as client:
        assert [m.id for m in client.models.list().data] == [model.id]


USER: list[Any] = [{"role": "user", "content": ASK}]
CALLED: list[Any] = [
    {"role": "user", "content": ASK},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
]
FN = {"name": "get_weather", "input_schema": {"type": "object"}}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
DOCUMENT = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("missing-max-tokens", {"max_tokens": None}, "max_tokens"),
    ("max-tokens-0", {"max_tokens": 0}, "max_tokens"),
    ("image-block", {"messages": [{"role": "user", "content": [IMAGE]}]}, "messages[0].content[0].type"),
    (
        "document-in-a-tool-result",
        {
            "messages": [
                *CALLED,
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [DOCUMENT]}]},
            ]
        },
        "messages[2].content[0].content[0].type",
    ),
    ("thinking", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ("service-tier", {"service_tier": "auto"}, "service_tier"),
    ("mcp-servers", {"mcp_servers": []}, "mcp_servers"),
    ("temperature-2", {"temperature": 2}, "temperature"),
    ("empty-messages", {"messages": []}, "messages"),
    ("system-role", {"messages": [{"role": "system", "content": "x"}, *USER]}, "messages[0].role"),
    (
        "orphan-tool-result",
        {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9"}]}]},
        "messages[0].content[0].tool_use_id",
    ),
    (
        "tool-use-from-the-user",
        {"messages": [{"role": "user", "content": CALLED[1]["content"]}]},
        "messages[0].content[0]",
    ),
    ("prefill", {"messages": [*USER, {"role": "assistant", "content": "Once"}]}, "messages[1].role"),
    ("server-tool", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ("schema-not-an-object", {"tools": [{**FN, "input_schema": {"type": "string"}}]}, "tools[0].input_schema"),
    ("choice-without-tools", {"tool_choice": {"type": "any"}}, "tool_choice"),
    ("choice-of-a-missing-tool", {"tools": [FN], "tool_choice": {"type": "tool", "name": "x"}}, "tool_choice"),
    ("stop-sequences-a-string", {"stop_sequences": "\n"}, "stop_sequences"),
    (
        "citations",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "citations": []}]}]},
        "messages[0].content[0].citations",
    ),
]


@pytest.mark.parametrize(("change", "param"), [(c, p) for _, c, p in BAD], ids=[i for i, _, _ in BAD])
async def test_bad_input_is_a_400_naming_the_field(make_client: MakeClient, change: dict[str, Any], param: str) -> None:
    client = await make_client()
    body = {"model": "m", "max_tokens": 4, "messages": USER, **change}
    resp = await client.post(URL, json={k: v for k, v in body.items() if v is not None})
    assert f"'{param}'" in error_of(resp.status, await resp.json(), "invalid_request_error") and resp.status == 400


@pytest.mark.parametrize(
    ("change", "param"),
    [(c, p) for i, c, p in BAD if "max-tokens" not in i],
    ids=[i for i, _, _ in BAD if "max-tokens" not in i],
)
async def test_count_tokens_refuses_what_messages_refuses(
    make_client: MakeClient, change: dict[str, Any], param: str
) -> None:
    """The same fields, the same words; the sampling fields, which count_tokens has not, are refused by name too."""
    client = await make_client()
    resp = await client.post(COUNT, json={"model": "m", "messages": USER, **change})
    assert f"'{param}'" in error_of(resp.status, await resp.json(), "invalid_request_error") and resp.status == 400


async def test_http_errors_on_these_paths_are_in_anthropic_s_shape(make_client: MakeClient) -> None:
    client = await make_client()
    missing = await client.post("/v1/messages/batches", json={})
    error_of(missing.status, await missing.json(), "not_found_error")
    assert missing.status == 404
    wrong_method = await client.get(URL)
    error_of(wrong_method.status, await wrong_method.json(), "invalid_request_error")
    not_json = await client.post(URL, data="hi", headers={"Content-Type": "text/plain"})
    error_of(not_json.status, await not_json.json(), "invalid_request_error")
    assert (wrong_method.status, not_json.status) == (405, 415)
    other = await client.post("/v1/chat/completions", json={})  # the OpenAI door keeps its own shape
    assert other.status == 400 and "param" in (await other.json())["error"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
BLOCKS = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "tool_use", "tool_result", "image"])},
    optional={"text": JSON_VALUES, "id": JSON_VALUES, "input": JSON_VALUES, "content": JSON_VALUES},
)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system"]), "content": st.text(max_size=5) | st.lists(BLOCKS)}
    ),
    max_size=3,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(max_size=5) | JSON_VALUES,
        "max_tokens": st.integers(-2, 10) | JSON_VALUES,
        "messages": MESSAGES | JSON_VALUES,
        **{name: JSON_VALUES for name in ("system", "tools", "tool_choice", "temperature", "top_p", "top_k")},
        **{name: JSON_VALUES for name in ("stop_sequences", "stream", "metadata", "thinking")},
    },
)


@pytest.mark.parametrize("route", [URL, COUNT])
async def test_fuzzed_bodies_never_cause_a_5xx(make_client: MakeClient, route: str) -> None:
    def refused(status: int, answer: Any) -> None:
        error_of(status, answer, "invalid_request_error")

    await fuzz(await make_client(), route, FIELDS | JSON_VALUES, refused, examples=80)


# ---- tool use, on a tiny model taught a call -----------------------------------------------------------------------

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}}}
TOOLS: list[Any] = [WEATHER, TIME]
QUESTION: Any = {"role": "user", "content": "What is the weather in Paris?"}
RESULT = '{"temperature": 22}'
ANSWER = "It is 22 degrees."


def openai_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {"name": tool["name"], "description": tool.get("description"), "parameters": tool["input_schema"]}
    return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


def after_call(call_id: str, result: Any = RESULT, **result_fields: Any) -> list[Any]:
    """The conversation once the model called get_weather and the tool answered, in Anthropic's words."""
    call = {"type": "tool_use", "id": call_id, "name": "get_weather", "input": {"city": "Paris"}}
    answer = {"type": "tool_result", "tool_use_id": call_id, "content": result, **result_fields}
    return [QUESTION, {"role": "assistant", "content": [call]}, {"role": "user", "content": [answer]}]


@pytest.fixture(scope="module")
def hermes_lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny model with a Hermes template (it renders tools), taught two answers on the prompts this door builds:
    a get_weather call for QUESTION, and ANSWER once the call has its result."""
    lm = hermes_model(build_tiny_model(tmp_path_factory.mktemp("anthropic-hermes"), context=1024))
    (eos,) = lm.eos_token_ids
    examples = []
    for messages, answer in [([QUESTION], W_CALL), (after_call("toolu_1"), ANSWER)]:
        req = parse_messages({"model": "m", "max_tokens": 1, "messages": messages, "tools": TOOLS})
        examples.append((lm.chat.encode(req.messages, req.tools), [*lm.tokenizer.encode(answer), eos]))
    return taught(lm, examples)


async def sdk_of(make_client: MakeClient, lm: LoadedModel) -> anthropic.AsyncAnthropic:
    client = await make_client(lm)
    return anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key="x", max_retries=0)


async def test_a_call_is_a_tool_use_block(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    async with await sdk_of(make_client, hermes_lm) as client:
        args: dict[str, Any] = {"model": "m", "max_tokens": 200, "messages": [QUESTION], "tools": TOOLS}
        done = await client.messages.create(**args, extra_body=GREEDY)
        async with client.messages.stream(**args, extra_body=GREEDY) as stream:
            raw = [event async for event in stream]
            final = await stream.get_final_message()
        count = await client.messages.count_tokens(model="m", messages=[QUESTION], tools=TOOLS)
    assert done.stop_reason == "tool_use" and done.stop_sequence is None
    (call,) = done.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    assert call.id
    assert final.stop_reason == "tool_use" and [
        (b.type, b.name, b.input) for b in final.content if b.type == "tool_use"
    ] == [("tool_use", "get_weather", {"city": "Paris"})]
    pieces = [
        e.delta.partial_json for e in raw if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert pieces and json.loads("".join(pieces)) == {"city": "Paris"}
    assert count.input_tokens == done.usage.input_tokens == final.usage.input_tokens


async def test_the_agent_loop_through_the_sdk(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    """The SDK user's loop: the answer's content goes back as it came, then the tool's result for its id."""
    messages: list[Any] = [QUESTION]
    async with await sdk_of(make_client, hermes_lm) as client:
        args: dict[str, Any] = {"model": "m", "max_tokens": 200, "tools": TOOLS, "extra_body": GREEDY}
        first = await client.messages.create(messages=messages, **args)
        (call,) = first.content
        assert call.type == "tool_use"
        messages += [
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": RESULT}]},
        ]
        second = await client.messages.create(messages=messages, **args)
    assert second.stop_reason == "end_turn" and text_of(second) == ANSWER


def openai_after_call(call_id: str, result: str = RESULT) -> list[Any]:
    arguments = json.dumps({"city": "Paris"})
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return [
        QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": result},
    ]


@pytest.mark.parametrize(
    ("messages", "openai_messages"),
    [
        (after_call("toolu_1"), openai_after_call("toolu_1")),
        (after_call("toolu_1", [{"type": "text", "text": RESULT}]), openai_after_call("toolu_1")),
        (after_call("toolu_1", is_error=True), openai_after_call("toolu_1", f"Error: {RESULT}")),
    ],
    ids=["result-string", "result-blocks", "is-error"],
)
async def test_tool_use_and_tool_result_are_the_openai_conversation(
    make_client: MakeClient, hermes_lm: LoadedModel, messages: list[Any], openai_messages: list[Any]
) -> None:
    """The same prompt, proven by its token count: count_tokens, the answer's input_tokens and the OpenAI door's
    prompt_tokens for the equivalent conversation (tool_calls, role tool) agree; and the answer is the same."""
    client = await make_client(hermes_lm)
    body = {"model": "m", "messages": messages, "tools": TOOLS}
    count = (await (await client.post(COUNT, json=body)).json())["input_tokens"]
    done = await (await client.post(URL, json={**body, "max_tokens": 200, **GREEDY})).json()
    tools = [openai_tool(t) for t in TOOLS]
    chat = {"messages": openai_messages, "tools": tools, "max_tokens": 200, **GREEDY}
    openai = await (await client.post("/v1/chat/completions", json=chat)).json()
    assert count == done["usage"]["input_tokens"] == openai["usage"]["prompt_tokens"]
    assert done["content"] == [{"type": "text", "text": openai["choices"][0]["message"]["content"]}]


@pytest.mark.parametrize(
    ("choice", "same_as"),
    [({"type": "none"}, {}), ({"type": "auto"}, {"tools": TOOLS}), ({"type": "any"}, {"tools": TOOLS})],
    ids=["none-keeps-the-tools-out", "auto", "any"],
)
async def test_tool_choice_counts(
    make_client: MakeClient, hermes_lm: LoadedModel, choice: dict[str, Any], same_as: dict[str, Any]
) -> None:
    client = await make_client(hermes_lm)
    counted = await client.post(
        COUNT, json={"model": "m", "messages": [QUESTION], "tools": TOOLS, "tool_choice": choice}
    )
    plain = await client.post(COUNT, json={"model": "m", "messages": [QUESTION], **same_as})
    assert (await counted.json())["input_tokens"] == (await plain.json())["input_tokens"]


async def test_a_named_tool_choice_calls_that_tool(make_client: MakeClient, hermes_lm: LoadedModel) -> None:
    """The model was taught get_weather here; the choice of get_time is enforced, and a strict tool's input keeps
    to its schema (a short one: the forced call ends soon)."""
    client = await make_client(hermes_lm)
    schema = {
        "type": "object",
        "properties": {"zone": {"type": "string", "maxLength": 10}},
        "required": ["zone"],
        "additionalProperties": False,
    }
    tools = [WEATHER, {"name": "get_time", "input_schema": schema, "strict": True}]
    choice = {"type": "tool", "name": "get_time", "disable_parallel_tool_use": True}
    body = {"model": "m", "max_tokens": 100, "messages": [QUESTION], "tools": tools, "tool_choice": choice, **GREEDY}
    done = await (await client.post(URL, json=body)).json()
    assert done["stop_reason"] == "tool_use", done
    (call,) = done["content"]
    assert call["type"] == "tool_use" and call["name"] == "get_time"
    jsonschema.validate(call["input"], schema)


# ---- over an --upstream server -------------------------------------------------------------------------------------


def test_through_an_upstream_the_answer_is_the_same(tiny_server: LiveServer, tiny_upstream: LiveServer) -> None:
    direct, through = create(tiny_server), create(tiny_upstream)
    assert text_of(through) == text_of(direct) and through.stop_reason == direct.stop_reason
    assert through.model == "claude-any-name"
    assert through.usage.input_tokens == direct.usage.input_tokens


def test_through_an_upstream_count_tokens_is_the_input_tokens(tiny_upstream: LiveServer) -> None:
    messages: Any = [{"role": "user", "content": ASK}]
    count = sdk(tiny_upstream).messages.count_tokens(model="any", messages=messages, system=SYSTEM)
    assert count.input_tokens == create(tiny_upstream, messages=messages, system=SYSTEM).usage.input_tokens


def test_openapi_lists_the_door(tiny_server: LiveServer) -> None:
    spec = tiny_server.get("/openapi.json")
    body = spec["paths"]["/v1/messages"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/AnthropicMessagesRequest"}
    schemas = spec["components"]["schemas"]
    assert {"max_tokens", "messages", "model"} <= set(schemas["AnthropicMessagesRequest"]["required"])
    assert "AnthropicError" in schemas and "/v1/messages/count_tokens" in spec["paths"]
