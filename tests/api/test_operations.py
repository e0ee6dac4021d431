"""Operations: auth, limits, metrics, request ids, OpenAPI, and behaviour under load, faults and disconnects."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import random
import re
from typing import Any

import pytest
import torch
from hypothesis import strategies as st

from api.config import BACKEND, LIFECYCLE
from backends.base import Limits
from models.loader import LoadedModel
from tests.conftest import MakeClient, Wrapped
from tests.helpers import delta_frames, fuzz, wait_until

KEY = "s3cret-key"
PROTECTED = [
    ("POST", "/chat", {"query": "hi", "max_tokens": 2}),
    ("POST", "/stream", {"query": "hi", "max_tokens": 2}),
    ("GET", "/clear", None),
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/messages", {"model": "any", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/messages/count_tokens", {"model": "any", "messages": [{"role": "user", "content": "hi"}]}),
    ("GET", "/api/tags", None),
    ("GET", "/api/version", None),
    ("GET", "/api/ps", None),
    ("POST", "/api/show", {"model": "tiny"}),
    ("POST", "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1, 2]}),
    ("GET", "/metrics", None),
]
# each door's 401 in its own shape: (path prefix, what its error body holds)
SHAPES = [("/v1/messages", "anthropic"), ("/api/", "ollama"), ("/", "openai")]


def error_of(path: str, body: dict[str, Any]) -> tuple[str, str]:
    """(door, error type or message) of an error body, in the shape the path's door answers with."""
    door = next(name for prefix, name in SHAPES if path.startswith(prefix))
    if door == "anthropic":
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        return door, body["error"]["type"]
    if door == "ollama":
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        return door, body["error"]
    return door, body["error"]["type"]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p for _, p, _ in PROTECTED])
async def test_api_key_guards_every_api_route(make_client: MakeClient, method: str, path: str, body: Any) -> None:
    client = await make_client(api_key=KEY, served_model_names=("tiny",))
    for headers, status in [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"x-api-key": "wrong"}, 401),
        ({"Authorization": "Bearer wrong", "x-api-key": KEY}, 200),  # either may carry it
        ({"Authorization": f"Bearer {KEY}"}, 200),
        ({"x-api-key": KEY}, 200),  # as Anthropic's clients send it
    ]:
        resp = await client.request(method, path, json=body, headers=headers)
        assert resp.status == status, (headers, await resp.text())
        if status == 401:
            door, says = error_of(path, await resp.json())
            assert says == ("missing or wrong API key" if door == "ollama" else "authentication_error")
            assert resp.headers["WWW-Authenticate"] == "Bearer"
        await resp.read()


async def test_page_and_health_stay_open_and_metrics_can_be_opened(make_client: MakeClient) -> None:
    client = await make_client(api_key=KEY, metrics_need_key=False)
    for path in ("/", "/static/app.js", "/health", "/metrics"):
        assert (await client.get(path)).status == 200, path


async def test_body_too_large_is_413(make_client: MakeClient) -> None:
    client = await make_client(max_body_bytes=1000)
    resp = await client.post("/chat", json={"query": "x" * 5000})
    assert resp.status == 413
    assert (await resp.json())["error"]["message"]


POSTED = [(path, body) for method, path, body in PROTECTED if method == "POST" and path not in ("/chat", "/stream")]


@pytest.mark.parametrize(("path", "body"), POSTED, ids=[p for p, _ in POSTED])
async def test_every_doors_refusals_take_its_own_shape(make_client: MakeClient, path: str, body: Any) -> None:
    """Refusals made before any door's code runs (size, content type, method, a path that is not there) still answer
    in the shape of the door the path belongs to, so its clients can read them."""
    client = await make_client(max_body_bytes=1000)
    padded = json.dumps({**body, "padding": "x" * 5000})
    cases = [
        (client.post(path, data=padded, headers={"Content-Type": "application/json"}), 413),
        (client.post(path, data=json.dumps(body), headers={"Content-Type": "text/plain"}), 415),
        (client.put(path, json=body), 405),
        (client.post(path + "/nothing-here", json=body), 404),
        (client.post(path, json={**body, "not_a_field": 1}), 400),
    ]
    for call, status in cases:
        resp = await call
        assert resp.status == status, (path, status, await resp.text())
        door, says = error_of(path, await resp.json())
        if door == "anthropic":
            kinds = {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large"}
            assert says == kinds.get(status, "invalid_request_error"), (status, says)
        elif door == "ollama":
            assert says, status
        if status == 400:
            assert "not_a_field" in str(await resp.json())


async def test_prompt_and_max_tokens_ceilings(make_client: MakeClient) -> None:
    client = await make_client(limits=Limits(max_prompt_tokens=20, max_tokens_limit=8))
    long = await client.post("/chat", json={"query": "many words " * 20})
    assert long.status == 400
    assert "20" in (await long.json())["error"]["message"]
    greedy = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}
    )
    error = (await greedy.json())["error"]
    assert greedy.status == 400 and error["param"] == "max_tokens" and "8" in error["message"]
    ok = await client.post("/chat", json={"query": "hi", "max_tokens": 8})
    assert ok.status == 200


async def test_connection_limit_is_a_429(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    client = await make_client(slow_lm, max_connections=1)
    first = await client.post("/stream", json={"query": "a", "max_tokens": 200, "ignore_eos": True})
    await first.content.readuntil(b"\n\n")
    second = await client.post("/chat", json={"query": "b", "max_tokens": 1})
    assert second.status == 429 and second.headers["Retry-After"]
    first.close()


async def test_queue_timeout_is_a_503(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    client = await make_client(slow_lm, max_batch_size=1, queue_timeout=0.2)
    first = await client.post("/stream", json={"query": "a", "max_tokens": 200, "ignore_eos": True})
    await first.content.readuntil(b"\n\n")
    for route in ("/chat", "/stream"):
        late = await client.post(route, json={"query": "b", "max_tokens": 1})
        assert late.status == 503, await late.text()
    first.close()


async def test_request_id_is_echoed_and_generated(make_client: MakeClient) -> None:
    client = await make_client()
    mine = await client.post("/stream", json={"query": "hi", "max_tokens": 2}, headers={"X-Request-ID": "abc-123"})
    assert mine.headers["X-Request-ID"] == "abc-123"
    other = await client.get("/health")
    assert len(other.headers["X-Request-ID"]) >= 8


async def test_metrics_count_requests_tokens_and_latency(make_client: MakeClient) -> None:
    client = await make_client()
    body = {"query": "hi", "max_tokens": 5, "ignore_eos": True, "temperature": 0}  # greedy: the same text every run
    frames = delta_frames(await (await client.post("/stream", json=body)).read())
    deltas = [f for f in frames if not f["finished"]]
    assert deltas
    await (await client.post("/chat", json={"query": ""})).read()
    text = await (await client.get("/metrics")).text()
    assert 'chat_requests_total{route="/stream",status="200"} 1.0' in text
    assert 'chat_requests_total{route="/chat",status="400"} 1.0' in text
    assert "chat_generation_tokens_total 5.0" in text
    assert "chat_time_to_first_token_seconds_count 1.0" in text
    assert f"chat_inter_token_latency_seconds_count {len(deltas) - 1}.0" in text
    assert "chat_queue_time_seconds_count 1.0" in text
    assert "chat_e2e_latency_seconds_count 1.0" in text  # the 400 generated nothing
    assert "chat_requests_running 0.0" in text and "chat_requests_waiting 0.0" in text


async def test_each_door_has_its_route_in_the_metrics(make_client: MakeClient) -> None:
    client = await make_client(served_model_names=("tiny",))
    for method, path, body in PROTECTED:
        await (await client.request(method, path, json=body)).read()
    await (await client.post("/api/chat", json={"model": "nope", "messages": []})).read()
    text = await (await client.get("/metrics")).text()
    for _, path, _ in PROTECTED:
        if path != "/metrics":  # it answers before its own count
            assert f'chat_requests_total{{route="{path}",status="200"}}' in text, path
    assert 'chat_requests_total{route="/api/chat",status="404"} 1.0' in text
    (generated,) = [line for line in text.splitlines() if line.startswith("chat_generation_tokens_total ")]
    assert float(generated.split()[1]) > 0


async def test_openapi_describes_every_route(make_client: MakeClient) -> None:
    client = await make_client()
    spec = await (await client.get("/openapi.json")).json()
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    for method, path, _ in PROTECTED:
        assert (method, path) in documented
    assert ("GET", "/health") in documented
    assert spec["components"]["schemas"]["ChatRequest"]["required"] == ["query"]


# ---- under load ---------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


async def test_64_concurrent_streams_several_rounds(make_client: MakeClient) -> None:
    client = await make_client(max_batch_size=16, max_queue=128)

    async def one(i: int) -> None:
        body = {"query": f"load {i} 你好", "max_tokens": 4 + i % 12, "temperature": 0.8, "seed": i}
        resp = await client.post("/stream", json=body)
        assert resp.status == 200
        frames = delta_frames(await resp.read())
        assert frames[-1]["finished"] is True and frames[-1]["finish_reason"] in ("stop", "length")
        assert "".join(f["delta"] for f in frames) == frames[-1]["response"]

    sizes = []
    for _ in range(4):
        await asyncio.gather(*(one(i) for i in range(64)))
        gc.collect()
        sizes.append(rss_bytes())
    assert client.app[BACKEND].counts == (0, 0)
    assert sizes[-1] - sizes[0] < 64 * 2**20, f"memory grew across rounds: {sizes}"


async def test_disconnect_storm(make_client: MakeClient) -> None:
    client = await make_client(max_batch_size=16, max_queue=128)
    engine = client.app[BACKEND]
    rng = random.Random(0)

    async def drop() -> None:
        resp = await client.post("/stream", json={"query": "storm", "max_tokens": 200, "ignore_eos": True})
        for _ in range(rng.randint(0, 5)):
            await resp.content.readuntil(b"\n\n")
        resp.close()

    await asyncio.gather(*(drop() for _ in range(100)))
    await wait_until(lambda: engine.counts == (0, 0), within=2.0)
    after = await client.post("/chat", json={"query": "fine?", "max_tokens": 3, "ignore_eos": True})
    assert (await after.json())["usage"]["completion_tokens"] == 3


class RaisesOnMarker(Wrapped):
    """The tiny model, except that a prompt containing the marker token breaks its forward pass."""

    def __init__(self, model: Any, marker: int) -> None:
        super().__init__(model)
        self.marker = marker

    def forward(self, **kwargs: Any) -> Any:
        if (kwargs["input_ids"] == self.marker).any() and kwargs["input_ids"].shape[1] > 1:
            raise RuntimeError("injected fault")
        return self.model(**kwargs)


async def test_a_fault_ends_only_its_own_stream(make_client: MakeClient, tiny_lm: LoadedModel) -> None:
    marker = tiny_lm.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    faulty = dataclasses.replace(tiny_lm, model=RaisesOnMarker(tiny_lm.model, marker), lean_decode=False)
    client = await make_client(faulty, max_batch_size=8)
    body = {"query": "fine", "max_tokens": 60, "ignore_eos": True}
    healthy = [await client.post("/stream", json=body) for _ in range(3)]
    for resp in healthy:
        await resp.content.readuntil(b"\n\n")  # all three are decoding in one batch
    broken = await client.post("/stream", json={"query": "boom <|endoftext|>", "max_tokens": 5})
    last = delta_frames(await broken.read())[-1]
    assert last["finished"] is True and last["finish_reason"] == "error"
    assert "injected fault" in last["error"]["message"]
    for resp in healthy:
        frames = delta_frames(await resp.read())
        assert frames[-1]["finish_reason"] == "length" and frames[-1]["usage"]["completion_tokens"] == 60


class NaNOnMarker(RaisesOnMarker):
    """The tiny model, except that a prompt containing the marker token gets NaN logits (as fp16 overflow does)."""

    def forward(self, **kwargs: Any) -> Any:
        out = self.model(**kwargs)
        if kwargs["input_ids"].shape[1] > 1:  # prompts only: a healthy stream may sample the marker itself
            out.logits[(kwargs["input_ids"] == self.marker).any(dim=-1)] = float("nan")
        return out


async def test_a_request_that_cannot_be_sampled_ends_alone(make_client: MakeClient, tiny_lm: LoadedModel) -> None:
    marker = tiny_lm.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    client = await make_client(
        dataclasses.replace(tiny_lm, model=NaNOnMarker(tiny_lm.model, marker), lean_decode=False)
    )
    body = {"query": "fine", "max_tokens": 40, "ignore_eos": True}
    healthy = [await client.post("/stream", json=body) for _ in range(2)]
    for resp in healthy:
        await resp.content.readuntil(b"\n\n")
    broken = await client.post("/chat", json={"query": "nan <|endoftext|>", "temperature": 1.0})
    assert broken.status == 500 and "generation failed" in (await broken.json())["error"]["message"]
    for resp in healthy:
        assert delta_frames(await resp.read())[-1]["usage"]["completion_tokens"] == 40


class BreaksDecodeSteps(Wrapped):
    """The tiny model, except that its one-token decode steps raise while `broken` is set."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.broken = False

    def forward(self, **kwargs: Any) -> Any:
        if self.broken and kwargs["input_ids"].shape[1] == 1:
            raise RuntimeError("injected decode fault")
        return self.model(**kwargs)


async def test_a_failed_decode_step_ends_its_batch_and_the_server_goes_on(
    make_client: MakeClient, tiny_lm: LoadedModel
) -> None:
    model = BreaksDecodeSteps(tiny_lm.model)
    client = await make_client(dataclasses.replace(tiny_lm, model=model, lean_decode=False), max_batch_size=8)
    body = {"query": "go", "max_tokens": 200, "ignore_eos": True}
    streams = [await client.post("/stream", json=body) for _ in range(3)]
    for resp in streams:
        await resp.content.readuntil(b"\n\n")
    model.broken = True  # one forward pass serves the whole batch, so its failure cannot be pinned on one request
    for resp in streams:
        last = delta_frames(await resp.read())[-1]
        assert last["finish_reason"] == "error" and "injected decode fault" in last["error"]["message"]
    model.broken = False
    after = await (await client.post("/chat", json={"query": "next", "max_tokens": 4, "ignore_eos": True})).json()
    assert after["usage"]["completion_tokens"] == 4
    assert client.app[BACKEND].counts == (0, 0)


async def test_an_unforeseen_fault_ends_what_was_generating_and_the_engine_goes_on(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from generation import batch

    client = await make_client(max_batch_size=8)
    body = {"query": "go", "max_tokens": 200, "ignore_eos": True}
    running = await client.post("/stream", json=body)
    await running.content.readuntil(b"\n\n")

    # KVBatch.add's own signature, so that the engine's call reaches the injected fault (a mismatch would raise a
    # TypeError of the test's making instead, which the log check below catches)
    def broken_add(self: batch.KVBatch, cache: Any, mask: torch.Tensor, max_rows: int = 1) -> None:
        raise AssertionError("injected bug")  # stands for a bug of ours, in the middle of the worker's step

    monkeypatch.setattr(batch.KVBatch, "add", broken_add)
    joining = await client.post("/stream", json=body)
    for resp in (running, joining):
        last = delta_frames(await resp.read())[-1]
        assert last["finish_reason"] == "error" and last["error"]["message"] == "generation failed: internal error"
    monkeypatch.undo()
    # the fault the engine handled is the injected one, caught where the worker's step fails
    faults = [r.exc_info[1] for r in caplog.records if r.getMessage().startswith("engine step failed") and r.exc_info]
    assert [(type(f), str(f)) for f in faults] == [(AssertionError, "injected bug")]
    assert client.app[BACKEND].counts == (0, 0) and client.app[BACKEND].running
    after = await (await client.post("/chat", json={"query": "next", "max_tokens": 4, "ignore_eos": True})).json()
    assert after["usage"]["completion_tokens"] == 4


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "query",
    "history",
    "system",
    "max_length",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "messages",
    "model",
    "n",
    "stop",
    "stream",
    "seed",
    "stream_options",
    "repetition_penalty",
    "min_tokens",
]
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6) | JSON_VALUES


@pytest.mark.parametrize("route", ["/chat", "/stream", "/v1/chat/completions"])
async def test_fuzzed_bodies_never_cause_a_5xx(make_client: MakeClient, route: str) -> None:
    def refused(status: int, answer: Any) -> None:
        assert "error" in answer, answer

    await fuzz(await make_client(), route, BODIES, refused)


async def test_shutting_down_refuses_new_requests(make_client: MakeClient) -> None:
    client = await make_client()
    client.app[LIFECYCLE].shutting_down = True
    resp = await client.post("/chat", json={"query": "hi"})
    assert resp.status == 503 and "shutting down" in (await resp.json())["error"]["message"]
    health = await client.get("/health")
    assert health.status == 503 and (await health.json())["status"] == "shutting_down"


async def test_one_log_line_per_request(make_client: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    client = await make_client()
    caplog.set_level(logging.INFO, logger="access")
    # Greedy, so the tiny model's first tokens are the same every run and make text (a random model can
    # sample a lone byte of a multi-byte character, which streams nothing and so has no time to first text).
    resp = await client.post("/stream", json={"query": "hi", "max_tokens": 3, "ignore_eos": True, "temperature": 0})
    frames = [f for f in (await resp.text()).split("\n\n") if f.startswith("event:")]
    assert '"finished":false' in frames[0]  # text came before the final frame
    lines = [r.getMessage() for r in caplog.records if r.name == "access"]
    assert len(lines) == 1
    line = lines[0]
    assert f"id={resp.headers['X-Request-ID']}" in line and "POST /stream status=200" in line
    assert "completion=3" in line and re.search(r"ttft=\d+\.\d{3} duration=\d+\.\d{3}", line)
