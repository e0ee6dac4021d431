"""Continuous batching: answers do not depend on who else is in the batch; slots are freed and reused."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

from api.config import BACKEND
from models.loader import LoadedModel
from tests.conftest import MakeClient, Wrapped
from tests.helpers import delta_frames, wait_until

PROMPTS = ["hi", "Tell me a long story about the sea and the sky.", "你好，世界！", "1 2 3 4 5 6 7 8 9 10 11 12 13"]


async def chat(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post("/chat", json=body)
    assert resp.status == 200, await resp.text()
    result: dict[str, Any] = await resp.json()
    return result


class PeakRunning:
    """Watches the engine while a test runs and remembers the largest batch it saw."""

    def __init__(self, client: Any) -> None:
        self.engine = client.app[BACKEND]
        self.peak = 0
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            self.peak = max(self.peak, self.engine.counts[0])
            await asyncio.sleep(0.002)

    def stop(self) -> int:
        self._task.cancel()
        return self.peak


async def test_greedy_answers_do_not_depend_on_batching(make_client: MakeClient) -> None:
    bodies = [
        {"query": p, "temperature": 0, "max_tokens": 24 + 4 * i, "ignore_eos": True} for i, p in enumerate(PROMPTS)
    ]
    alone_client = await make_client(max_batch_size=1)
    alone = [(await chat(alone_client, b))["response"] for b in bodies]
    client = await make_client(max_batch_size=8)
    watch = PeakRunning(client)
    together = await asyncio.gather(*(chat(client, b) for b in bodies))
    assert watch.stop() > 1, "the requests never shared a batch"
    assert [r["response"] for r in together] == alone


async def test_requests_join_and_leave_mid_batch(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    alone_client = await make_client(max_batch_size=1)
    long_body = {"query": "long one", "temperature": 0, "max_tokens": 200, "ignore_eos": True}
    short = [{"query": p, "temperature": 0, "max_tokens": 6, "ignore_eos": True} for p in PROMPTS]
    expected_long = (await chat(alone_client, long_body))["response"]
    expected_short = [(await chat(alone_client, b))["response"] for b in short]

    client = await make_client(slow_lm, max_batch_size=8)  # the same weights, 20 ms a step: the long one outlasts
    resp = await client.post("/stream", json=long_body)
    await resp.content.readuntil(b"\n\n")  # the long request is decoding
    for body, expected in zip(short, expected_short, strict=True):
        assert client.app[BACKEND].counts[0] >= 1
        assert (await chat(client, body))["response"] == expected  # joined, finished and left
    frames = delta_frames(await resp.read())
    assert frames[-1]["response"] == expected_long


async def test_each_request_keeps_its_own_parameters(make_client: MakeClient) -> None:
    bodies = [
        {"query": "a", "temperature": 0, "max_tokens": 12, "ignore_eos": True},
        {"query": "b", "temperature": 1.0, "seed": 5, "max_tokens": 20, "ignore_eos": True},
        {"query": "c", "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 9, "max_tokens": 16},
        {"query": "d", "temperature": 0, "repetition_penalty": 1.5, "max_tokens": 10, "ignore_eos": True},
    ]
    alone_client = await make_client(max_batch_size=1)
    alone = [await chat(alone_client, b) for b in bodies]
    client = await make_client(max_batch_size=4)
    together = await asyncio.gather(*(chat(client, b) for b in bodies))
    for a, t in zip(alone, together, strict=True):
        assert (t["response"], t["usage"], t["finish_reason"]) == (a["response"], a["usage"], a["finish_reason"])


async def test_cancel_inside_a_batch_frees_the_slot(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    client = await make_client(slow_lm, max_batch_size=2, max_queue=4)
    engine = client.app[BACKEND]
    body = {"query": "x", "max_tokens": 200, "ignore_eos": True}
    leaving = await client.post("/stream", json=body)
    staying = await client.post("/stream", json={**body, "max_tokens": 60})
    await leaving.content.readuntil(b"\n\n")
    await staying.content.readuntil(b"\n\n")
    assert engine.counts == (2, 0)
    waiting = asyncio.create_task(chat(client, {"query": "y", "max_tokens": 5, "ignore_eos": True}))
    await wait_until(lambda: engine.counts == (2, 1))
    leaving.close()
    # the cancelled row leaves; the waiting request takes its slot and finishes
    assert (await waiting)["usage"]["completion_tokens"] == 5
    assert delta_frames(await staying.read())[-1]["usage"]["completion_tokens"] == 60
    await wait_until(lambda: engine.counts == (0, 0))


async def test_32_requests_through_a_batch_of_4(make_client: MakeClient) -> None:
    client = await make_client(max_batch_size=4, max_queue=64)
    bodies = [
        {"query": f"request {i}", "temperature": 0, "max_tokens": 3 + i % 5, "ignore_eos": True} for i in range(32)
    ]
    watch = PeakRunning(client)
    results = await asyncio.gather(*(chat(client, b) for b in bodies))
    assert watch.stop() == 4
    for body, result in zip(bodies, results, strict=True):
        assert result["query"] == body["query"]
        assert result["usage"]["completion_tokens"] == body["max_tokens"]
    alone_client = await make_client(max_batch_size=1)
    for body, result in list(zip(bodies, results, strict=True))[::7]:
        assert (await chat(alone_client, body))["response"] == result["response"]


class RecordsPrefills(Wrapped):
    """The tiny model, noting the batch size of every prefill (a forward pass over more than one position)."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.prefill_sizes: list[int] = []
        self.gate = threading.Event()  # the first prefill waits for it

    def forward(self, **kwargs: Any) -> Any:
        if kwargs["input_ids"].shape[1] > 1:
            if not self.prefill_sizes:
                self.gate.wait(30)
            self.prefill_sizes.append(kwargs["input_ids"].shape[0])
        return self.model(**kwargs)


async def test_requests_arriving_together_are_prefilled_together(make_client: MakeClient, tiny_lm: LoadedModel) -> None:
    queries = ["question number one", "question two", "the third question", "q four", "fifth question here"]
    bodies = [{"query": q, "temperature": 0, "max_tokens": 12, "ignore_eos": True} for q in queries]
    alone_client = await make_client(max_batch_size=1)
    alone = [(await chat(alone_client, b))["response"] for b in bodies]
    recorder = RecordsPrefills(tiny_lm.model)
    client = await make_client(dataclasses.replace(tiny_lm, model=recorder, lean_decode=False), max_batch_size=8)
    # a first request holds the worker in its prefill until all the others are waiting
    first = asyncio.create_task(chat(client, {"query": "first", "max_tokens": 2}))
    await wait_until(lambda: client.app[BACKEND].counts == (1, 0))
    together = asyncio.gather(*(chat(client, b) for b in bodies))
    await wait_until(lambda: client.app[BACKEND].counts == (1, len(bodies)))
    recorder.gate.set()
    await first
    assert [r["response"] for r in await together] == alone
    assert max(recorder.prefill_sizes) > 1, f"no prefill was shared: {recorder.prefill_sizes}"
