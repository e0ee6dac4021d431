"""The upstream backend's paths beside chat: a raw prompt goes to the upstream's legacy /v1/completions and its
text_completion chunks come back as events (text, legacy logprobs, vLLM's stop_reason); /tokenize and /detokenize
go to the upstream's own routes at its root. Tested at the Backend interface, against an upstream in the test's
process that records what it was asked, so what travels each way is seen exactly."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from backends.base import BackendError, ChatJob, Delta, Event, Finished, Message, Sampling, SamplingDefaults, Tokens
from backends.upstream import UpstreamBackend, UpstreamConfig

DEFAULTS = SamplingDefaults(temperature=1.0, top_p=1.0)


def text_chunk(text: str, reason: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason, **extra}
    return b"data: " + json.dumps({"object": "text_completion", "choices": [choice]}).encode()


class Recorder:
    """An upstream that records each request's path and body; /v1/completions replays `lines`, /tokenize and
    /detokenize answer `answers[path]` (a (status, body) pair)."""

    def __init__(self, lines: list[bytes], answers: dict[str, tuple[int, Any]] | None = None) -> None:
        self.lines, self.answers = lines, answers or {}
        self.asked: list[tuple[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.stream)
        app.router.add_post("/v1/chat/completions", self.stream)
        app.router.add_post("/tokenize", self.answer)
        app.router.add_post("/detokenize", self.answer)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "up"}]})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self.asked.append((request.path, await request.json()))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for line in [*self.lines, b"data: [DONE]"]:
            await response.write(line + b"\n\n")
        return response

    async def answer(self, request: web.Request) -> web.Response:
        self.asked.append((request.path, await request.json()))
        status, body = self.answers.get(request.path, (404, {"error": {"message": "Not Found"}}))
        return web.json_response(body, status=status)


@pytest.fixture
async def backend_of(aiohttp_server: Any) -> AsyncIterator[Any]:
    started: list[UpstreamBackend] = []

    async def make(recorder: Recorder) -> UpstreamBackend:
        server = await aiohttp_server(recorder.app())
        backend = UpstreamBackend(UpstreamConfig(f"http://127.0.0.1:{server.port}/v1"))
        await backend.start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.stop(0.1)


async def events(backend: UpstreamBackend, job: ChatJob) -> list[Event]:
    (stream,) = await backend.open(job)
    return [e async for e in stream.events()]


def raw_job(prompt: str, **sampling: Any) -> ChatJob:
    return ChatJob((), Sampling(**sampling), DEFAULTS, prompt=prompt, prompt_param="prompt")


async def test_a_raw_prompt_is_a_legacy_completion_and_its_text_comes_back(backend_of: Any) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    lines = [
        text_chunk("Once"),
        text_chunk(" upon", "stop", stop_reason="\n\n"),
        b"data: " + json.dumps({"object": "text_completion", "choices": [], "usage": usage}).encode(),
    ]
    recorder = Recorder(lines)
    backend = await backend_of(recorder)
    got = await events(backend, raw_job("Tell me", max_tokens=5, stop=("\n\n",), temperature=0.0))
    assert [e.text for e in got if isinstance(e, Delta)] == ["Once", " upon"]
    (done,) = [e for e in got if isinstance(e, Finished)]
    assert (done.reason, done.stop_sequence, done.prompt_tokens, done.completion_tokens) == ("stop", "\n\n", 3, 2)
    ((path, body),) = recorder.asked
    assert path == "/v1/completions"
    assert body["prompt"] == "Tell me" and "messages" not in body
    assert (body["max_tokens"], body["stop"], body["temperature"]) == (5, ["\n\n"], 0.0)


async def test_a_chat_answers_stop_reason_names_its_stop_string(backend_of: Any) -> None:
    choice = {"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop", "stop_reason": "END"}
    recorder = Recorder([b"data: " + json.dumps({"choices": [choice]}).encode()])
    backend = await backend_of(recorder)
    job = ChatJob((Message("user", "hi"),), Sampling(stop=("END",)), DEFAULTS)
    got = await events(backend, job)
    (done,) = [e for e in got if isinstance(e, Finished)]
    assert done.stop_sequence == "END" and recorder.asked[0][0] == "/v1/chat/completions"


async def test_a_stop_token_id_as_stop_reason_is_no_stop_string(backend_of: Any) -> None:
    backend = await backend_of(Recorder([text_chunk("Hi", "stop", stop_reason=128009)]))
    (done,) = [e for e in await events(backend, raw_job("x")) if isinstance(e, Finished)]
    assert done.reason == "stop" and done.stop_sequence is None


async def test_legacy_logprobs_come_back_as_token_logprobs(backend_of: Any) -> None:
    # the legacy API lists the sampled token among the alternatives besides the k asked for: the likeliest k stay
    top = [{"Hi": -0.5, "Ho": -2.0}, {"é": -1.0, "e": -0.25}, {"bytes:\\xa9": -0.1}]
    # a token that is no whole character on its own is written as its bytes, as OpenAI writes it
    tokens = ["Hi", "é", "bytes:\\xa9"]
    logprobs = {"tokens": tokens, "token_logprobs": [-0.5, -1.0, -0.1], "top_logprobs": top}
    recorder = Recorder([text_chunk("Hié\ufffd", "length", logprobs=logprobs)])
    backend = await backend_of(recorder)
    got = await events(backend, raw_job("x", logprobs=1))
    (delta,) = [e for e in got if isinstance(e, Delta)]
    assert [(t.token, t.logprob, bytes(t.bytes)) for t in delta.logprobs] == [
        ("Hi", -0.5, b"Hi"),
        ("é", -1.0, "é".encode()),
        ("bytes:\\xa9", -0.1, b"\xa9"),
    ]
    assert [[(a.token, a.logprob, bytes(a.bytes)) for a in t.top] for t in delta.logprobs] == [
        [("Hi", -0.5, b"Hi")],
        [("e", -0.25, b"e")],
        [("bytes:\\xa9", -0.1, b"\xa9")],
    ]
    body = recorder.asked[0][1]
    assert body["logprobs"] == 1 and "top_logprobs" not in body  # the legacy API's number of alternatives


async def test_tokenize_asks_the_upstreams_own_route_with_the_prompt_or_the_messages(backend_of: Any) -> None:
    answers = {"/tokenize": (200, {"count": 3, "max_model_len": 2048, "tokens": [1, 2, 3]})}
    recorder = Recorder([], answers)
    backend = await backend_of(recorder)
    assert await backend.tokenize(raw_job("abc")) == Tokens((1, 2, 3), 2048)
    job = ChatJob((Message("system", "be brief"), Message("user", "hi")), Sampling(), DEFAULTS)
    assert await backend.tokenize(job) == Tokens((1, 2, 3), 2048)
    (_, first), (_, second) = recorder.asked
    assert first == {"model": "up", "prompt": "abc"}
    assert second == {
        "model": "up",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    }


async def test_detokenize_reads_vllms_or_llama_cpps_answer(backend_of: Any) -> None:
    recorder = Recorder([], {"/detokenize": (200, {"prompt": "Hello"})})
    backend = await backend_of(recorder)
    assert await backend.detokenize((5, 6)) == "Hello"
    assert recorder.asked == [("/detokenize", {"model": "up", "tokens": [5, 6]})]
    other = await backend_of(Recorder([], {"/detokenize": (200, {"content": "Hi"})}))
    assert await other.detokenize((5,)) == "Hi"


@pytest.mark.parametrize(
    ("answer", "status", "says"),
    [
        ((404, {"error": {"message": "Not Found"}}), 502, "rejected the request (404)"),
        ((400, {"error": {"message": "bad prompt"}}), 400, "bad prompt"),
        ((200, {"tokens": "1 2"}), 502, "answered /tokenize with no list of token ids"),
        ((200, [1, 2]), 502, "answered /tokenize with no JSON object"),
        ((200, {"tokens": []}), 502, "counted no tokens"),  # llama.cpp's, which reads `content`
    ],
    ids=["no-route", "refused", "not-ids", "not-an-object", "llama-cpp"],
)
async def test_an_upstream_without_a_usable_tokenize_is_a_clear_error(
    backend_of: Any, answer: tuple[int, Any], status: int, says: str
) -> None:
    backend = await backend_of(Recorder([], {"/tokenize": answer}))
    with pytest.raises(BackendError) as caught:
        await backend.tokenize(raw_job("abc"))
    assert caught.value.status == status and says in caught.value.message


async def test_an_upstream_400_names_the_field_it_blames(backend_of: Any) -> None:
    refusal = {"error": {"message": "'tokens' holds 99999", "type": "invalid_request_error", "param": "tokens"}}
    backend = await backend_of(Recorder([], {"/detokenize": (400, refusal)}))
    with pytest.raises(BackendError) as caught:
        await backend.detokenize((99999,))
    assert (caught.value.status, caught.value.param) == (400, "tokens")
    assert caught.value.message == "the upstream refused the request: 'tokens' holds 99999"
