"""The Ollama door (`/api/...`): the official `ollama` client against a live server on the tiny model, the NDJSON
framing as raw HTTP reads it, its errors in Ollama's shape, a tool call the tiny model is taught to make, and the same
door in front of an --upstream."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import jsonschema
import ollama
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import strategies as st

from api.config import BACKEND, LIFECYCLE
from api.ollama_schema import parse_chat
from models.loader import LoadedModel
from tests.conftest import JSON, LiveServer, MakeClient, build_tiny_model
from tests.helpers import fuzz, wait_until
from tests.training import hermes_model, taught

Client = TestClient[web.Request, web.Application]

# a prompt whose greedy answer on the tiny model runs on (the tests that need it check so first)
STORY: list[dict[str, Any]] = [{"role": "user", "content": "Tell me a story"}]
GREEDY = {"temperature": 0, "num_predict": 24}
KEY = "s3cret-key"
NAMES = ("tiny",)  # the tiny model served under the name tiny_server gives it
# a schema whose every answer is short: the answer is whole JSON well within num_predict
SMALL_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}


@pytest.fixture
def client(tiny_server: LiveServer) -> Iterator[ollama.Client]:
    """The official client on tiny_server; closed after the test (its connections with it)."""
    with ollama.Client(host=tiny_server.url, timeout=60) as sdk:
        yield sdk


def openai_chat(server: LiveServer, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens}
    answer: dict[str, Any] = server.post("/v1/chat/completions", body)
    return answer


def raw_post(server: LiveServer, path: str, body: dict[str, Any]) -> tuple[str, bytes]:
    """(Content-Type, body bytes) of a POST read as raw HTTP."""
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST", headers=JSON)
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.headers["Content-Type"], r.read()


def ndjson(body: bytes) -> list[dict[str, Any]]:
    """The objects of an NDJSON body, strictly: one JSON object a line, each line ended."""
    text = body.decode()
    assert text.endswith("\n"), "the last line must be ended"
    objects = [json.loads(line) for line in text[:-1].split("\n")]
    assert all(isinstance(o, dict) for o in objects)
    return objects


# ---- the listing routes ---------------------------------------------------------------------------------------------


def test_version_tags_show_and_ps_describe_the_served_model(tiny_server: LiveServer, client: ollama.Client) -> None:
    health = tiny_server.get("/health")
    assert tiny_server.get("/api/version")["version"].count(".") == 2

    (listed,) = client.list().models
    assert listed.model == "tiny:latest" and listed.size == health["weight_bytes"] and listed.digest == ""
    assert listed.details is not None
    assert (
        listed.details.quantization_level == {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[health["dtype"]]
    )

    for name in ("tiny", "tiny:latest"):
        shown = client.show(name)
        assert shown.capabilities == (["completion", "tools"] if health["tool_calls"] else ["completion"])
        assert shown.details is not None and shown.details.family == health["architecture"] == "llama"
        assert shown.modelinfo is not None
        (length,) = [v for k, v in shown.modelinfo.items() if k.endswith(".context_length")]
        assert length == health["context_length"]

    (loaded,) = client.ps().models
    assert loaded.model == "tiny:latest" and loaded.size_vram == 0  # on the CPU
    assert loaded.context_length == health["context_length"] and loaded.expires_at is not None


def test_an_unknown_model_is_a_404_on_every_route(client: ollama.Client) -> None:
    calls = [
        lambda: client.chat("nope", STORY),
        lambda: client.generate("nope", "hi"),
        lambda: client.show("nope"),
        lambda: list(client.chat("nope", STORY, stream=True)),
    ]
    for call in calls:
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == 404 and "nope" in caught.value.error and "not found" in caught.value.error


# ---- answers --------------------------------------------------------------------------------------------------------


def test_greedy_chat_is_the_openai_doors_answer(tiny_server: LiveServer, client: ollama.Client) -> None:
    answer = client.chat("tiny", STORY, options=GREEDY)
    direct = openai_chat(tiny_server, STORY, GREEDY["num_predict"])
    (choice,) = direct["choices"]
    assert answer.message.role == "assistant" and answer.message.content == choice["message"]["content"]
    assert answer.done is True and answer.done_reason == choice["finish_reason"]
    assert answer.prompt_eval_count == direct["usage"]["prompt_tokens"]
    assert answer.eval_count == direct["usage"]["completion_tokens"]
    durations = [answer.total_duration, answer.prompt_eval_duration, answer.eval_duration, answer.load_duration]
    assert all(isinstance(d, int) and d >= 0 for d in durations)
    assert answer.total_duration and answer.total_duration >= (answer.prompt_eval_duration or 0) + (
        answer.eval_duration or 0
    )


def test_streamed_answers_add_up_to_the_whole_ones(client: ollama.Client) -> None:
    whole = client.chat("tiny", STORY, options=GREEDY)
    chunks = list(client.chat("tiny", STORY, options=GREEDY, stream=True))
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len(chunks) > 2 and "".join(c.message.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].done_reason == whole.done_reason and chunks[-1].eval_count == whole.eval_count

    generated = client.generate("tiny", "Tell me a story", options=GREEDY)
    pieces = list(client.generate("tiny", "Tell me a story", options=GREEDY, stream=True))
    assert "".join(p.response or "" for p in pieces) == generated.response and pieces[-1].done
    assert generated.context is None  # no conversation state: documented


def test_generate_prompts_through_the_template_unless_raw(client: ollama.Client) -> None:
    system, prompt = "Be brief.", "Tell me a story"
    chat = client.chat("tiny", [{"role": "system", "content": system}, *STORY], options=GREEDY)
    generated = client.generate("tiny", prompt, system=system, options=GREEDY)
    assert generated.response == chat.message.content and generated.prompt_eval_count == chat.prompt_eval_count

    # the chat template's text sent raw is the very prompt the template makes
    plain = client.chat("tiny", STORY, options=GREEDY)
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"  # tests.conftest.CHAT_TEMPLATE's
    raw = client.generate("tiny", text, raw=True, options=GREEDY)
    assert raw.response == plain.message.content and raw.prompt_eval_count == plain.prompt_eval_count
    # raw text is not put through the template: the bare prompt is another one
    bare = client.generate("tiny", prompt, raw=True, options=GREEDY)
    assert bare.prompt_eval_count is not None and plain.prompt_eval_count is not None
    assert bare.prompt_eval_count < plain.prompt_eval_count


def test_nothing_to_say_is_ollamas_load_answer(client: ollama.Client) -> None:
    for loaded in (client.generate("tiny"), client.generate("tiny", "", raw=True)):
        assert (loaded.done, loaded.done_reason, loaded.response, loaded.eval_count) == (True, "load", "", None)
    chatted = client.chat("tiny", [])
    assert (chatted.done_reason, chatted.message.content) == ("load", "")
    for keep_alive in (0, "0s", "0m0s"):  # Ollama's way to unload a model: said so, the model stays all the same
        assert client.generate("tiny", keep_alive=keep_alive).done_reason == "unload"
    assert client.generate("tiny", keep_alive="5m").done_reason == "load"


def test_num_predict_ends_the_answer_with_length(tiny_server: LiveServer, client: ollama.Client) -> None:
    assert openai_chat(tiny_server, STORY, 60)["choices"][0]["finish_reason"] == "length"  # it would run on
    for n in (1, 7):
        answer = client.chat("tiny", STORY, options={"temperature": 0, "num_predict": n})
        assert (answer.done_reason, answer.eval_count) == ("length", n)
    # -1: no limit of its own; the answer runs to the end of the model's context
    unbounded = client.chat("tiny", STORY, options={"temperature": 0, "num_predict": -1})
    assert unbounded.eval_count and unbounded.prompt_eval_count
    assert unbounded.eval_count + unbounded.prompt_eval_count == tiny_server.get("/health")["context_length"]


def test_a_stop_from_the_answer_ends_it_before_the_stop(client: ollama.Client) -> None:
    answer = client.chat("tiny", STORY, options=GREEDY).message.content or ""
    # a stop well inside the answer, of whole characters
    start = next(i for i in range(4, len(answer) - 2) if "\ufffd" not in answer[i : i + 2])
    stop = answer[start : start + 2]
    stopped = client.chat("tiny", STORY, options={**GREEDY, "stop": [stop]})
    assert stopped.message.content == answer[: answer.index(stop)] and stopped.done_reason == "stop"
    generated = client.generate("tiny", "Tell me a story", options={**GREEDY, "stop": [stop]})
    assert stop not in (generated.response or "")


def test_options_that_tune_ollamas_runtime_change_nothing(client: ollama.Client) -> None:
    runtime = {"num_ctx": 4096, "num_thread": 2, "num_gpu": 1, "num_batch": 8, "use_mmap": True, "numa": False}
    runtime.update(low_vram=False, main_gpu=0, num_keep=4)
    plain = client.chat("tiny", STORY, options=GREEDY)
    tuned = client.chat("tiny", STORY, options={**GREEDY, **runtime}, keep_alive="5m", think=False)
    assert tuned.message.content == plain.message.content


def test_format_holds_the_answer_to_json(client: ollama.Client) -> None:
    options = {"temperature": 0, "num_predict": 100}
    assert isinstance(
        json.loads(client.chat("tiny", STORY, format="json", options=options).message.content or ""), dict
    )
    shaped = client.chat("tiny", STORY, format=SMALL_SCHEMA, options=options)
    jsonschema.validate(json.loads(shaped.message.content or ""), SMALL_SCHEMA)
    generated = client.generate("tiny", "Tell me a story", format=SMALL_SCHEMA, options=options)
    jsonschema.validate(json.loads(generated.response or ""), SMALL_SCHEMA)


def test_logprobs_are_the_openai_doors(tiny_server: LiveServer, client: ollama.Client) -> None:
    answer = client.chat("tiny", STORY, options=GREEDY, logprobs=True, top_logprobs=2)
    body = {"messages": STORY, "temperature": 0, "max_tokens": GREEDY["num_predict"], "logprobs": True}
    direct = tiny_server.post("/v1/chat/completions", {**body, "top_logprobs": 2})["choices"][0]["logprobs"]["content"]
    assert answer.logprobs is not None and len(answer.logprobs) == len(direct) > 0
    # two requests, so equal up to float32's last bits: under the AVX2 emulation the same prompt, prefilled whole
    # both times, gave logprobs 5e-7 apart in one run of three (a float32 matmul need not sum in the same order from
    # one call to the next; MKL's, for one, depends on memory alignment)
    for ours, theirs in zip(answer.logprobs, direct, strict=True):
        assert ours.token == theirs["token"] and ours.logprob == pytest.approx(theirs["logprob"], abs=1e-5)
        assert ours.top_logprobs is not None
        assert [t.token for t in ours.top_logprobs] == [t["token"] for t in theirs["top_logprobs"]]
        top = [t.logprob for t in ours.top_logprobs]
        assert top == pytest.approx([t["logprob"] for t in theirs["top_logprobs"]], abs=1e-5)
    streamed = list(client.chat("tiny", STORY, options=GREEDY, logprobs=True, stream=True))
    assert [t.token for c in streamed for t in c.logprobs or ()] == [t.token for t in answer.logprobs]
    assert all(t.top_logprobs == [] for c in streamed for t in c.logprobs or ())  # none asked for


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_streams_are_ndjson_with_done_on_the_last_line_only(tiny_server: LiveServer, path: str) -> None:
    body: dict[str, Any] = {"model": "tiny", "options": GREEDY}  # no `stream`: Ollama streams by default
    body.update({"messages": STORY} if path == "/api/chat" else {"prompt": "Tell me a story"})
    content_type, raw = raw_post(tiny_server, path, body)
    assert content_type == "application/x-ndjson"
    objects = ndjson(raw)
    assert len(objects) > 2 and [o["done"] for o in objects] == [False] * (len(objects) - 1) + [True]
    assert all(o["model"] == "tiny" and o["created_at"].endswith("Z") for o in objects)
    last = objects[-1]
    assert last["done_reason"] in ("stop", "length") and last["eval_count"] >= 1
    content_type, whole = raw_post(tiny_server, path, {**body, "stream": False})
    assert content_type.startswith("application/json") and json.loads(whole)["done"] is True


# ---- errors ---------------------------------------------------------------------------------------------------------

CHAT = {"model": "tiny", "messages": STORY}
GENERATE = {"model": "tiny", "prompt": "hi"}
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("/api/chat", {**CHAT, "options": {"mirostat": 2}}, "options.mirostat"),
    ("/api/chat", {**CHAT, "options": {"tfs_z": 1.0}}, "options.tfs_z"),
    ("/api/chat", {**CHAT, "options": {"min_p": 0.1}}, "options.min_p"),
    ("/api/chat", {**CHAT, "options": {"temperature": "hot"}}, "options.temperature"),
    ("/api/chat", {**CHAT, "options": {"num_predict": 0}}, "options.num_predict"),
    ("/api/chat", {**CHAT, "options": {"num_predict": 10**9}}, "options.num_predict"),
    ("/api/chat", {**CHAT, "options": {"stop": "x"}}, "options.stop"),
    ("/api/chat", {**CHAT, "options": []}, "options"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, "images"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "tool_name": "f"}]}, "messages[0].tool_name"),
    ("/api/chat", {"model": "tiny", "messages": "hi"}, "messages"),
    ("/api/chat", {**CHAT, "think": True}, "think"),
    ("/api/chat", {**CHAT, "format": "xml"}, "format"),
    ("/api/chat", {**CHAT, "stream": "yes"}, "stream"),
    ("/api/chat", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/api/chat", {**CHAT, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function"),
    ("/api/chat", {"messages": STORY}, "model"),
    ("/api/chat", {**CHAT, "context": [1, 2]}, "context"),
    ("/api/chat", {**CHAT, "keep_alive": "nonsense"}, "keep_alive"),
    ("/api/chat", {**CHAT, "keep_alive": True}, "keep_alive"),
    ("/api/generate", {**GENERATE, "images": ["aGk="]}, "images"),
    ("/api/generate", {**GENERATE, "template": "{{ .Prompt }}"}, "template"),
    ("/api/generate", {**GENERATE, "context": [1, 2, 3]}, "context"),
    ("/api/generate", {**GENERATE, "suffix": "end"}, "suffix"),
    ("/api/generate", {**GENERATE, "raw": True, "system": "s"}, "system"),
    ("/api/generate", {**GENERATE, "prompt": 5}, "prompt"),
    ("/api/generate", {**GENERATE, "width": 512}, "width"),
    ("/api/show", {}, "model"),
    ("/api/show", {"model": 3}, "model"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD, ids=[f"{p}-{f}" for p, _, f in BAD])
async def test_bad_input_is_a_400_naming_the_field(make_client: MakeClient, path: str, body: Any, field: str) -> None:
    client = await make_client(served_model_names=NAMES)
    resp = await client.post(path, json=body)
    answer = await resp.json()
    assert resp.status == 400 and list(answer) == ["error"] and field in answer["error"], answer


async def test_every_refusal_on_the_ollama_paths_is_in_ollamas_shape(make_client: MakeClient) -> None:
    client = await make_client(api_key=KEY, max_body_bytes=4096, served_model_names=NAMES)
    auth = {"Authorization": f"Bearer {KEY}"}
    refusals = [
        (await client.get("/api/tags"), 401),
        (await client.get("/api/tags", headers={"Authorization": "Bearer wrong"}), 401),
        (await client.post("/api/chat", json=CHAT, headers={"x-api-key": "wrong"}), 401),
        (await client.get("/api/nope", headers=auth), 404),
        (await client.get("/api/chat", headers=auth), 405),
        (await client.post("/api/chat", data="hi", headers={**auth, "Content-Type": "text/plain"}), 415),
        (await client.post("/api/chat", json={**CHAT, "pad": "x" * 5000}, headers=auth), 413),
    ]
    for resp, status in refusals:
        answer = await resp.json()
        assert resp.status == status and list(answer) == ["error"] and isinstance(answer["error"], str), answer
    assert (await client.get("/api/tags", headers=auth)).status == 200
    assert (await client.get("/api/version", headers={"x-api-key": KEY})).status == 200

    client.app[LIFECYCLE].shutting_down = True
    resp = await client.post("/api/chat", json=CHAT, headers=auth)
    assert resp.status == 503 and "shutting down" in (await resp.json())["error"]


async def test_too_many_requests_is_a_429_in_ollamas_shape(make_client: MakeClient) -> None:
    client = await make_client(max_connections=0, served_model_names=NAMES)
    resp = await client.post("/api/generate", json=GENERATE)
    assert resp.status == 429 and isinstance((await resp.json())["error"], str)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["model", "messages", "prompt", "system", "raw", "options", "format", "stream", "tools", "think", "name"]
FIELDS += ["keep_alive", "images", "context", "template", "suffix", "logprobs", "top_logprobs"]
OPTIONS = st.dictionaries(
    st.sampled_from(["temperature", "top_k", "top_p", "num_predict", "stop", "seed", "repeat_penalty", "num_ctx"]),
    JSON_VALUES,
    max_size=3,
)
# some bodies name the served model, so the fuzzing reaches past the model check
BODIES = (
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6)
    | st.fixed_dictionaries({"model": st.just("tiny"), "options": OPTIONS, "stream": st.booleans()}).flatmap(
        lambda base: st.dictionaries(st.sampled_from(FIELDS[1:]), JSON_VALUES, max_size=3).map(lambda d: {**d, **base})
    )
    | JSON_VALUES
)


@pytest.mark.parametrize("route", ["/api/chat", "/api/generate", "/api/show"])
async def test_fuzzed_bodies_never_cause_a_5xx(make_client: MakeClient, route: str) -> None:
    def refused(status: int, answer: Any) -> None:
        assert list(answer) == ["error"] and isinstance(answer["error"], str), answer

    await fuzz(await make_client(served_model_names=NAMES), route, BODIES, refused)


async def test_a_client_that_leaves_stops_its_generation(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    body = {"model": "tiny", "messages": STORY, "options": {"temperature": 0, "num_predict": 200}}
    fast = await make_client(served_model_names=NAMES)
    whole = await (await fast.post("/api/chat", json={**body, "stream": False})).json()
    assert whole["eval_count"] == 200  # left alone, it runs all 200 tokens: over 4 s on the slow model

    client = await make_client(slow_lm, served_model_names=NAMES)
    engine = client.app[BACKEND]
    resp = await client.post("/api/chat", json=body)
    assert resp.status == 200
    await resp.content.readline()
    await resp.content.readline()
    assert engine.counts[0] == 1
    resp.close()
    await wait_until(lambda: engine.counts == (0, 0), within=2.0)


async def test_an_answer_cut_short_ends_with_an_error_line(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    client = await make_client(slow_lm, served_model_names=NAMES)
    body = {"model": "tiny", "messages": STORY, "options": {"temperature": 0, "num_predict": 200}}
    resp = await client.post("/api/chat", json=body)
    first = json.loads(await resp.content.readline())
    assert first["done"] is False
    await client.app[BACKEND].stop(0.1)  # the server stops under the answer
    *_, last = ndjson(await resp.content.read())
    assert list(last) == ["error"] and isinstance(last["error"], str) and last["error"]


# ---- tools: a tiny model taught to call one -------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = {"role": "user", "content": "Weather in Paris?"}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def caller_lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny model with a Hermes template, taught to call get_weather on the prompt /api/chat builds for ASK."""
    lm = hermes_model(build_tiny_model(tmp_path_factory.mktemp("ollama-tools"), context=512))
    (eos,) = lm.eos_token_ids
    req = parse_chat({"model": "tiny", "messages": [ASK], "tools": [WEATHER]})
    examples = [(lm.chat.encode(req.messages, req.tools), [*lm.tokenizer.encode(CALL, add_special_tokens=False), eos])]
    return taught(lm, examples, steps=40, rounds=6)


async def test_a_call_comes_as_ollamas_tool_calls(make_client: MakeClient, caller_lm: LoadedModel) -> None:
    client = await make_client(caller_lm)
    body = {"model": caller_lm.name, "messages": [ASK], "tools": [WEATHER], "options": {"temperature": 0}}
    whole = ollama.ChatResponse.model_validate(
        await (await client.post("/api/chat", json={**body, "stream": False})).json()
    )
    assert whole.done_reason == "stop" and whole.message.content == ""
    (call,) = whole.message.tool_calls or ()
    assert (call.function.name, dict(call.function.arguments)) == ("get_weather", {"city": "Paris"})

    resp = await client.post("/api/chat", json=body)
    chunks = [ollama.ChatResponse.model_validate(o) for o in ndjson(await resp.read())]
    assert "".join(c.message.content or "" for c in chunks) == ""  # the call's markup is not text
    assert [c.message.tool_calls for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].message.tool_calls == whole.message.tool_calls

    # the history sent back as the client holds it, with the tool's result: the prompt is the one the OpenAI door
    # builds from the same conversation with call ids
    back = whole.message.model_dump(exclude_none=True)
    result = {"role": "tool", "content": '{"temperature": 22}', "tool_name": "get_weather"}
    history = {**body, "messages": [ASK, back, result], "options": {"temperature": 0, "num_predict": 5}}
    ours = await (await client.post("/api/chat", json={**history, "stream": False})).json()
    called = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    openai_messages = [ASK, {"role": "assistant", "content": None, "tool_calls": [called]}]
    openai_messages.append({"role": "tool", "tool_call_id": "call_1", "content": result["content"]})
    openai_body = {"messages": openai_messages, "tools": [WEATHER], "temperature": 0, "max_tokens": 5}
    theirs = await (await client.post("/v1/chat/completions", json=openai_body)).json()
    assert ours["prompt_eval_count"] == theirs["usage"]["prompt_tokens"]
    assert ours["message"]["content"] == theirs["choices"][0]["message"]["content"]


# ---- in front of an upstream ----------------------------------------------------------------------------------------


def test_through_an_upstream_the_answers_are_the_same(tiny_server: LiveServer, tiny_upstream: LiveServer) -> None:
    with ollama.Client(host=tiny_server.url, timeout=60) as direct, ollama.Client(host=tiny_upstream.url) as proxied:
        same_answers(direct, proxied)


def same_answers(direct: ollama.Client, proxied: ollama.Client) -> None:
    assert [m.model for m in proxied.list().models] == ["up:latest"]
    chat = proxied.chat("up", STORY, options=GREEDY)
    assert chat.message.content == direct.chat("tiny", STORY, options=GREEDY).message.content
    streamed = list(proxied.chat("up", STORY, options=GREEDY, stream=True))
    assert "".join(c.message.content or "" for c in streamed) == chat.message.content
    raw = proxied.generate("up", "Tell me a story", raw=True, options=GREEDY)
    assert raw.response == direct.generate("tiny", "Tell me a story", raw=True, options=GREEDY).response
    assert raw.eval_count == GREEDY["num_predict"] and raw.done_reason == "length"
    # the upstream's context length, as its /tokenize reports it (its architecture it does not say)
    info = direct.show("tiny").modelinfo or {}
    arch = info["general.architecture"]
    assert arch and info[f"{arch}.context_length"] > 0
    assert proxied.show("up").modelinfo == {
        "general.architecture": "",
        "general.context_length": info[f"{arch}.context_length"],
    }
