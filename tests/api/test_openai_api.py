"""OpenAI Chat Completions, driven by the official `openai` SDK against live servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from api.config import BACKEND
from models.loader import LoadedModel
from tests.conftest import LiveServer, MakeClient
from tests.helpers import parse_frames, wait_until

MESSAGES: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def client(tiny_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)


def greedy(client: openai.OpenAI, **kwargs: Any) -> Any:
    args: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 24}
    return client.chat.completions.create(**{**args, **kwargs})


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_non_streaming_answer_and_usage(client: openai.OpenAI) -> None:
    done = greedy(client)
    assert done.id.startswith("chatcmpl-") and done.object == "chat.completion" and done.model == "tiny"
    (choice,) = done.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert done.usage is not None
    assert 0 < done.usage.completion_tokens <= 24
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


def test_streaming_equals_non_streaming_and_reports_usage(client: openai.OpenAI) -> None:
    done = greedy(client)
    chunks = list(greedy(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [done.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == done.usage


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    done = greedy(client, max_tokens=7, extra_body={"ignore_eos": True})
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 7
    newer = greedy(client, max_tokens=None, max_completion_tokens=5, extra_body={"ignore_eos": True})
    assert newer.usage is not None and newer.usage.completion_tokens == 5


def test_min_tokens_gives_the_exact_length(client: openai.OpenAI) -> None:
    done = greedy(client, max_tokens=12, extra_body={"min_tokens": 12})
    assert done.usage is not None and done.usage.completion_tokens == 12


def test_stop_removes_the_stop_string_and_the_rest(client: openai.OpenAI) -> None:
    full = greedy(client, max_tokens=40, extra_body={"ignore_eos": True}).choices[0].message.content
    # a stop string taken from the middle of the greedy answer: the answer must end right before it
    stop = next(full[i : i + 2] for i in range(6, len(full) - 2) if full[i : i + 2].strip())
    cut = full.index(stop)
    done = greedy(client, max_tokens=40, stop=[stop, "never-appears"], extra_body={"ignore_eos": True})
    assert done.choices[0].message.content == full[:cut]
    assert done.choices[0].finish_reason == "stop"
    streamed = greedy(client, max_tokens=40, stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:cut]


def test_n_choices(client: openai.OpenAI) -> None:
    # max_tokens bounds each choice, not the answer: with no end of sequence, each choice runs to all 8 of its own
    done = greedy(client, n=3, temperature=1.0, seed=3, max_tokens=8, extra_body={"ignore_eos": True})
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert [c.finish_reason for c in done.choices] == ["length"] * 3
    assert done.usage is not None and done.usage.completion_tokens == 3 * 8
    assert len({c.message.content for c in done.choices}) == 3  # each choice samples with its own seed
    chunks = list(greedy(client, n=2, stream=True, max_tokens=4))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]  # each choice ends once, on its own


async def test_choice_i_is_the_answer_to_seed_plus_i(make_client: MakeClient) -> None:
    """Each of n choices samples as a request of its own with seed + i would: the same text and end, and the usage
    counts every choice's own tokens (the prompt once). In process, on the float32 model, whose answers are the same
    in a batch as alone."""
    url = str((await make_client()).make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0) as sdk:
        model = (await sdk.models.list()).data[0].id
        args: dict[str, Any] = {"model": model, "messages": MESSAGES, "temperature": 1.0, "max_tokens": 8}
        done = await sdk.chat.completions.create(**args, n=3, seed=12)
        alone = [await sdk.chat.completions.create(**args, seed=12 + i) for i in range(3)]
    assert [c.index for c in done.choices] == [0, 1, 2]
    answers = [(a.choices[0].message.content, a.choices[0].finish_reason) for a in alone]
    assert [(c.message.content, c.finish_reason) for c in done.choices] == answers
    assert len({text for text, _ in answers}) == 3
    tokens = [a.usage.completion_tokens for a in alone if a.usage is not None]
    assert len(tokens) == 3 and all(0 < n <= 8 for n in tokens)
    assert done.usage is not None and alone[0].usage is not None
    assert done.usage.completion_tokens == sum(tokens)
    assert done.usage.prompt_tokens == alone[0].usage.prompt_tokens


def test_seed_reproduces_sampling(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str | None:
        return greedy(client, temperature=1.0, seed=seed, max_tokens=24).choices[0].message.content

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_text_parts_are_accepted(client: openai.OpenAI) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story."}]}]
    plain = [{"role": "user", "content": "Tell me a story."}]
    answer = greedy(client, messages=parts).choices[0].message.content
    assert answer == greedy(client, messages=plain).choices[0].message.content


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"n": 9}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
    ids=["temperature", "no-messages", "role", "n", "stop", "max_tokens"],
)
def test_bad_requests_raise_bad_request_error(client: openai.OpenAI, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        greedy(client, **kwargs)
    assert info.value.status_code == 400
    assert info.value.param == param


def test_prompt_over_the_context_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        greedy(client, messages=[{"role": "user", "content": "word " * 400}])


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        greedy(client, model="gpt-4")
    assert info.value.code == "model_not_found"


async def test_async_client_streams(tiny_server: LiveServer) -> None:
    client = openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)
    args: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 16}
    done = await client.chat.completions.create(**args)
    text = ""
    async for chunk in await client.chat.completions.create(**args, stream=True):
        text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert text == done.choices[0].message.content
    await client.close()


async def test_raw_sse_framing(make_client: MakeClient) -> None:
    client = await make_client()
    body = {"messages": MESSAGES, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    raw = await resp.read()
    assert b"event:" not in raw
    frames = parse_frames(raw)
    assert all(event is None for event, _ in frames)
    assert raw.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(data) for _, data in frames[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["usage"]["completion_tokens"] <= 5


async def test_stream_disconnect_stops_generation(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    client = await make_client(slow_lm)  # 200 tokens take over 4 s: only a cancellation ends them within 2 s
    engine = client.app[BACKEND]
    body = {"messages": MESSAGES, "max_tokens": 200, "stream": True, "ignore_eos": True}
    resp = await client.post("/v1/chat/completions", json=body)
    await resp.content.readuntil(b"\n\n")
    await resp.content.readuntil(b"\n\n")
    assert engine.counts[0] == 1
    resp.close()
    await wait_until(lambda: engine.counts == (0, 0), within=2.0)


def test_bundled_model_through_the_sdk(bundled_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=bundled_server.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    done = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0
    )
    assert "Paris" in (done.choices[0].message.content or "")


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": NaN}', "frequency_penalty"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999}', "max_tokens"),
    ],
    ids=["half-an-emoji", "nan", "infinity"],
)
async def test_what_the_sdk_cannot_send_is_still_a_400(make_client: MakeClient, raw: bytes, param: str) -> None:
    client = await make_client()
    resp = await client.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == param


async def test_a_choice_whose_events_raise_ends_failed_and_the_merge_ends() -> None:
    """`n` choices are read by one task each; one that raises (a bug) must still end, or the answer waits forever."""
    from api.http import merge
    from backends.base import Delta, Event, Failed, Finished

    async def good() -> AsyncIterator[Event]:
        yield Delta("a")
        yield Finished("stop", 1, 1)

    async def broken() -> AsyncIterator[Event]:
        yield Delta("b")
        raise RuntimeError("a bug")

    async with asyncio.timeout(5):  # a hang fails here
        got = [item async for item in merge([good(), broken()])]
    ends = {i: e for i, e in got if isinstance(e, (Finished, Failed))}
    assert isinstance(ends[0], Finished) and isinstance(ends[1], Failed) and "internal error" in ends[1].message


async def test_leaving_a_merge_early_stops_its_readers() -> None:
    from contextlib import aclosing

    from api.http import merge
    from backends.base import Delta, Event

    stopped: list[int] = []

    async def endless(i: int) -> AsyncIterator[Event]:
        try:
            while True:
                yield Delta(str(i))
                await asyncio.sleep(0.01)
        finally:
            stopped.append(i)

    async with aclosing(merge([endless(0), endless(1)])) as events:
        async for _ in events:
            break  # a failure answered early returns like this
    assert sorted(stopped) == [0, 1]  # at once, not when the generator is collected
