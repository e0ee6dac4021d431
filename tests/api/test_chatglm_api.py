"""The ChatGLM web-stream API (`/chat`, `/stream`, `/clear`, `/health`) end to end on the tiny model."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
from typing import Any

import pytest

from api.chatglm_web import chatglm_messages
from api.config import BACKEND
from models.chat_format import TemplateFormat, encode_chat
from models.loader import LoadedModel
from tests.conftest import TINY_CONTEXT, MakeClient
from tests.helpers import delta_frames, wait_until


async def test_chat_answers_and_extends_history(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.post("/chat", json={"query": "你好", "history": [["hi", "hello"]], "max_tokens": 8})
    assert resp.status == 200
    body = await resp.json()
    assert body["success"] is True
    assert body["query"] == "你好"
    assert isinstance(body["response"], str)
    assert body["history"] == [["hi", "hello"], ["你好", body["response"]]]
    assert body["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert 0 < u["completion_tokens"] <= 8 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


async def test_stream_frames_concatenate_to_the_final_response(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.post("/stream", json={"query": "讲个故事 😀", "max_tokens": 40, "temperature": 0.9, "seed": 7})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Accel-Buffering"] == "no"
    frames = delta_frames(await resp.read())
    *partial, last = frames
    assert partial and all(f["finished"] is False for f in partial)
    assert last["finished"] is True and last["delta"] == ""
    assert "".join(f["delta"] for f in frames) == last["response"]
    running = ""
    for f in partial:
        running += f["delta"]
        assert f["response"] == running
    assert last["query"] == "讲个故事 😀"
    assert last["history"] == [["讲个故事 😀", last["response"]]]
    assert last["usage"]["completion_tokens"] <= 40


async def test_stream_and_chat_agree_under_greedy(make_client: MakeClient) -> None:
    client = await make_client()
    body = {"query": "What is the capital of France?", "temperature": 0, "max_tokens": 20}
    first = await (await client.post("/chat", json=body)).json()
    second = await (await client.post("/chat", json=body)).json()
    streamed = delta_frames(await (await client.post("/stream", json=body)).read())[-1]
    assert first["response"] == second["response"] == streamed["response"]
    assert first["usage"] == streamed["usage"]


async def test_seed_makes_sampling_reproducible(make_client: MakeClient) -> None:
    client = await make_client()

    async def answer(seed: int) -> str:
        body = {"query": "hello", "temperature": 1.0, "top_p": 1.0, "max_tokens": 24, "seed": seed}
        return (await (await client.post("/chat", json=body)).json())["response"]

    a, b, c = await answer(1), await answer(1), await answer(2)
    assert a == b
    assert a != c


async def test_max_tokens_caps_the_answer(make_client: MakeClient) -> None:
    client = await make_client()
    body = await (await client.post("/chat", json={"query": "hi", "max_tokens": 5, "ignore_eos": True})).json()
    assert body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


async def test_max_length_counts_prompt_and_answer(make_client: MakeClient) -> None:
    client = await make_client()
    body = await (await client.post("/chat", json={"query": "hi", "max_length": 40, "ignore_eos": True})).json()
    assert body["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == 40


async def test_long_history_is_trimmed_oldest_first(make_client: MakeClient, tiny_lm: LoadedModel) -> None:
    client = await make_client()
    history = [[f"old question {i} " * 5, f"old answer {i} " * 5] for i in range(30)]
    resp = await client.post("/chat", json={"query": "new", "history": history, "max_tokens": 16})
    assert resp.status == 200
    body = await resp.json()
    # the prompt is the newest rounds that fit with room for the 16 tokens asked for
    sizes = [
        len(encode_chat(tiny_lm.tokenizer, chatglm_messages(None, [(q, a) for q, a in history[k:]], "new")))
        for k in range(31)
    ]
    first_kept = next(k for k, n in enumerate(sizes) if n + 16 <= TINY_CONTEXT)
    assert 0 < first_kept < 30 and body["usage"]["prompt_tokens"] == sizes[first_kept]
    assert body["history"][:-1] == history  # the client's history comes back whole


async def test_history_that_fits_is_kept_whole(make_client: MakeClient, tiny_lm: LoadedModel) -> None:
    client = await make_client()  # the default answer length (1024) is more than the tiny model's whole context
    history = [["hi", "hello"], ["how are you?", "fine, thanks"]]
    body = await (await client.post("/chat", json={"query": "and you?", "history": history})).json()
    rounds = [("hi", "hello"), ("how are you?", "fine, thanks")]
    whole = encode_chat(tiny_lm.tokenizer, chatglm_messages(None, rounds, "and you?"))
    assert body["usage"]["prompt_tokens"] == len(whole)
    assert body["usage"]["total_tokens"] <= TINY_CONTEXT


async def test_query_too_long_for_the_context_is_400(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.post("/stream", json={"query": "word " * 400})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "query" and "maximum context length" in error["message"]


async def test_system_prompt_reaches_the_model(make_client: MakeClient) -> None:
    client = await make_client()
    plain = await (await client.post("/chat", json={"query": "hi", "max_tokens": 1})).json()
    system = await (
        await client.post("/chat", json={"query": "hi", "system": "You are terse.", "max_tokens": 1})
    ).json()
    assert system["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]


FALSY_HISTORIES: list[Any] = ["", 0, False, {}]
BAD_BODIES = [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({}).encode(), "query"),
    (json.dumps({"query": ""}).encode(), "query"),
    (json.dumps({"query": 3}).encode(), "query"),
    (json.dumps({"query": "q", "history": "x"}).encode(), "history"),
    (json.dumps({"query": "q", "history": [["only one"]]}).encode(), "history"),
    (json.dumps({"query": "q", "history": [[1, 2]]}).encode(), "history"),
    (json.dumps({"query": "q", "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"query": "q", "temperature": -1}).encode(), "temperature"),
    (json.dumps({"query": "q", "top_p": -0.1}).encode(), "top_p"),
    (json.dumps({"query": "q", "top_p": 1.5}).encode(), "top_p"),
    (json.dumps({"query": "q", "top_k": 1.5}).encode(), "top_k"),
    (json.dumps({"query": "q", "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"query": "q", "max_tokens": True}).encode(), "max_tokens"),
    (json.dumps({"query": "q", "max_length": -5}).encode(), "max_length"),
    (json.dumps({"query": "q", "repetition_penalty": 0}).encode(), "repetition_penalty"),
    (json.dumps({"query": "q", "system": ["x"]}).encode(), "system"),
    # Python's json reads these; none of them is a sampling setting or text
    (b'{"query": "q", "temperature": NaN}', "temperature"),
    (b'{"query": "q", "repetition_penalty": NaN}', "repetition_penalty"),
    (b'{"query": "q", "presence_penalty": Infinity}', "presence_penalty"),
    (b'{"query": "q", "temperature": 1' + b"0" * 400 + b"}", "temperature"),  # an int too large for a float
    (b'{"query": "\\ud800"}', "query"),
    (b'{"query": "q", "history": [["ok", "\\udfff"]]}', "history[0][1]"),
    (b"[" * 100_000, None),
    (b'{"query": "q", "max_tokens": ' + b"1" * 5000 + b"}", None),
    *[(json.dumps({"query": "q", "history": h}).encode(), "history") for h in FALSY_HISTORIES],
]


@pytest.mark.parametrize("route", ["/chat", "/stream"])
@pytest.mark.parametrize(("raw", "field"), BAD_BODIES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_BODIES)])
async def test_bad_input_is_a_400_naming_the_field(
    make_client: MakeClient, route: str, raw: bytes, field: str | None
) -> None:
    client = await make_client()
    resp = await client.post(route, data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert resp.headers["Content-Type"].startswith("application/json")
    error = (await resp.json())["error"]
    assert error["param"] == field
    if field:
        assert field in error["message"]
    ok = await client.post("/chat", json={"query": "still there?", "max_tokens": 2})
    assert ok.status == 200


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/nowhere", 404), ("PUT", "/chat", 405)])
async def test_unknown_routes_get_json_errors(make_client: MakeClient, method: str, path: str, status: int) -> None:
    client = await make_client()
    resp = await client.request(method, path)
    assert resp.status == status
    assert (await resp.json())["error"]["message"]


async def test_disconnect_stops_generation_and_frees_the_engine(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    client = await make_client(slow_lm)  # 200 tokens take over 4 s: only a cancellation ends them within 2 s
    engine = client.app[BACKEND]
    resp = await client.post("/stream", json={"query": "go on", "max_tokens": 200, "ignore_eos": True})
    assert (await resp.content.readuntil(b"\n\n")).startswith(b"event: delta")
    assert engine.counts[0] == 1
    resp.close()  # the client goes away mid-stream
    await wait_until(lambda: engine.counts == (0, 0), within=2.0)
    after = await client.post("/chat", json={"query": "next", "max_tokens": 3, "ignore_eos": True})
    assert (await after.json())["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat", {"query": "go on"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "go on"}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "go on"}], "n": 2}),
    ],
    ids=["chat", "openai", "openai-n2"],
)
async def test_a_client_that_leaves_a_whole_answer_request_stops_it(
    make_client: MakeClient, slow_lm: LoadedModel, path: str, body: dict[str, Any]
) -> None:
    # no byte is written until the answer is complete, so the server must notice the closed connection itself
    client = await make_client(slow_lm)
    engine = client.app[BACKEND]
    request = asyncio.create_task(client.post(path, json={**body, "max_tokens": 200, "ignore_eos": True}))
    await wait_until(lambda: engine.counts[0] >= 1)
    request.cancel()  # closes the connection
    await wait_until(lambda: engine.counts == (0, 0), within=2.0)


async def test_a_client_that_leaves_the_queue_frees_its_place(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    client = await make_client(slow_lm, max_batch_size=1, max_queue=1)
    engine = client.app[BACKEND]
    body = {"query": "long", "max_tokens": 200, "ignore_eos": True}
    running = await client.post("/stream", json=body)
    await running.content.readuntil(b"\n\n")
    waiting = asyncio.create_task(client.post("/chat", json=body))
    await wait_until(lambda: engine.counts == (1, 1))
    waiting.cancel()
    await wait_until(lambda: engine.counts == (1, 0), within=2.0)  # long before the running answer ends
    queued = asyncio.create_task(client.post("/chat", json={**body, "max_tokens": 2}))
    await wait_until(lambda: engine.counts == (1, 1))  # the freed place is taken, not refused with 429
    running.close()
    assert (await (await queued).json())["usage"]["completion_tokens"] == 2


async def test_top_p_zero_keeps_only_the_likeliest_token(make_client: MakeClient) -> None:
    client = await make_client()
    body = {"query": "hello", "max_tokens": 12, "ignore_eos": True}
    greedy = await (await client.post("/chat", json={**body, "temperature": 0})).json()
    narrow = await (await client.post("/chat", json={**body, "temperature": 1.0, "top_p": 0})).json()
    assert narrow["response"] == greedy["response"]


async def test_a_chat_template_that_refuses_the_conversation_is_a_400(
    make_client: MakeClient, tiny_lm: LoadedModel
) -> None:
    tokenizer = copy.deepcopy(tiny_lm.tokenizer)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + tokenizer.chat_template
    )
    client = await make_client(dataclasses.replace(tiny_lm, tokenizer=tokenizer, chat=TemplateFormat(tokenizer)))
    resp = await client.post("/chat", json={"query": "hi", "system": "be brief"})
    assert resp.status == 400 and "System role not supported" in (await resp.json())["error"]["message"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    resp = await client.post("/v1/chat/completions", json={"messages": messages})
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == "messages" and "System role not supported" in error["message"]
    resp = await client.post("/chat", json={"query": "hi", "max_tokens": 2})
    assert resp.status == 200


async def test_clear_is_harmless_and_leaves_streams_alone(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    client = await make_client(slow_lm)
    resp = await client.post("/stream", json={"query": "go", "max_tokens": 30, "ignore_eos": True})
    await resp.content.readuntil(b"\n\n")
    for method in ("GET", "POST"):
        cleared = await client.request(method, "/clear")
        # nothing in the prefix cache yet: the only request is still running
        assert cleared.status == 200 and await cleared.json() == {"success": True, "prefix_cache_freed_bytes": 0}
    assert client.app[BACKEND].counts[0] == 1  # still generating after /clear
    rest = delta_frames(await resp.read())
    assert rest[-1]["finished"] is True and rest[-1]["usage"]["completion_tokens"] == 30


async def test_health_reports_model_and_load(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    client = await make_client(slow_lm, max_batch_size=1)
    body: dict[str, Any] = await (await client.get("/health")).json()
    assert body["status"] == "ok" and body["model"] == slow_lm.name and body["context_length"] == TINY_CONTEXT
    assert body["device"] == "cpu" and body["dtype"] == "float32"
    assert (body["running"], body["waiting"]) == (0, 0)
    streams = [await client.post("/stream", json={"query": "go", "max_tokens": 200, "ignore_eos": True})]
    await streams[0].content.readuntil(b"\n\n")
    waiting = asyncio.create_task(client.post("/chat", json={"query": "then", "max_tokens": 2}))
    await wait_until(lambda: client.app[BACKEND].counts == (1, 1))
    body = await (await client.get("/health")).json()
    assert (body["running"], body["waiting"]) == (1, 1)
    streams[0].close()
    assert (await waiting).status == 200


async def test_full_queue_is_a_429_with_retry_after(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    client = await make_client(slow_lm, max_batch_size=1, max_queue=1)
    body = {"query": "long", "max_tokens": 200, "ignore_eos": True}
    first = await client.post("/stream", json=body)
    await first.content.readuntil(b"\n\n")  # running now
    # waits in the queue; its headers come with its first token
    second = asyncio.create_task(client.post("/stream", json=body))
    await wait_until(lambda: client.app[BACKEND].counts == (1, 1))
    third = await client.post("/chat", json=body)
    assert third.status == 429
    assert third.headers["Retry-After"]
    assert (await third.json())["error"]["type"] == "rate_limit_error"
    first.close()
    (await second).close()
