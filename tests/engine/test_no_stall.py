"""No client can stall the others: prompt work off the event loop, trimming without one encoding per round,
long prompts prefilled in chunks between decode steps, and a port in use refused before the model loads."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import socket
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

import api.chatglm_web
import api.http
from api.config import BACKEND
from backends.base import Limits
from generation.prepare import load_model
from generation.prompts import PromptTooLong, fit_chat
from generation.scheduler import chunk_size
from models.chat_format import ChatFormat, Message, SamplingDefaults, TextStream
from models.loader import LoadedModel, ModelConfig
from models.tools.base import Tool, ToolFormat
from sse import dumps
from tests.conftest import MakeClient, Wrapped, build_tiny_model
from tests.helpers import wait_until
from tests.server.test_cli import run_cli

# ---- trimming ----------------------------------------------------------------------------------------


def one_encoding_per_round(
    chat: ChatFormat, messages: Sequence[Message], context: int, reserve: int, budget: int | None
) -> tuple[list[int], int]:
    """The trimming this server did before: encode, drop the oldest round, encode again. The oracle (the budget:
    at most that many prompt tokens while history is left)."""
    system = [m for m in messages[:1] if m.role == "system"]
    rest = list(messages[len(system) :])
    dropped = 0
    while True:
        ids = chat.encode(system + rest[dropped:])
        within = budget is None or len(ids) <= budget
        if (within and len(ids) + reserve <= context) or len(rest) - dropped <= 1:
            break
        dropped += 2 if len(rest) - dropped > 2 else 1
    if len(ids) >= context:
        raise PromptTooLong(len(ids), context)
    return ids, dropped


class Counting:
    """A chat format that counts how many messages it encodes in all."""

    def __init__(self, chat: ChatFormat) -> None:
        self.chat, self.calls, self.messages = chat, 0, 0

    @property
    def defaults(self) -> SamplingDefaults | None:
        return self.chat.defaults

    @property
    def tool_format(self) -> ToolFormat | None:
        return self.chat.tool_format

    def encode(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> list[int]:
        self.calls += 1
        self.messages += len(messages)
        return self.chat.encode(messages, tools)

    def encode_text(self, text: str) -> list[int]:
        return self.chat.encode_text(text)

    def response_stream(self) -> TextStream:
        return self.chat.response_stream()


def conversation(rounds: int, system: bool = False, leading_assistant: bool = False, query: str = "and?") -> list:
    messages = [Message("system", "You are terse.")] if system else []
    if leading_assistant:
        messages.append(Message("assistant", "Welcome back."))
    for i in range(rounds):
        messages += [Message("user", f"question {i} " * (1 + i % 3)), Message("assistant", f"answer {i} " * 2)]
    return [*messages, Message("user", query)]


CASES = {  # messages, reserve, budget
    "fits": (conversation(2), 1, None),
    "one-round-too-many": (conversation(12), 1, None),
    "many-rounds": (conversation(60), 1, None),
    "system-prompt": (conversation(40, system=True), 1, None),
    "odd-number-of-messages": (conversation(40, leading_assistant=True), 1, None),
    "max-tokens-reserve": (conversation(40), 120, None),
    "query-alone-too-long": (conversation(3, query="word " * 400), 1, None),
    "history-budget": (conversation(40, system=True), 1, 90),
    "budget-below-the-query": (conversation(5, query="word " * 60), 1, 20),
}


@pytest.mark.parametrize("family", ["template", "plain", "chatglm-6b"])
@pytest.mark.parametrize("case", CASES)
def test_trimming_keeps_the_same_rounds_as_one_encoding_per_round(
    case: str, family: str, tiny_lm: LoadedModel, plain_lm: LoadedModel, glm_lm: LoadedModel
) -> None:
    chat = {"template": tiny_lm, "plain": plain_lm, "chatglm-6b": glm_lm}[family].chat
    messages, reserve, budget = CASES[case]
    try:
        want: Any = one_encoding_per_round(chat, messages, 256, reserve, budget)
    except PromptTooLong as exc:
        want = exc.prompt_tokens
    try:
        got: Any = fit_chat(chat, messages, 256, reserve, budget)
    except PromptTooLong as exc:
        got = exc.prompt_tokens
    assert got == want


def test_trimming_a_huge_history_encodes_little_more_than_it_keeps(tiny_lm: LoadedModel) -> None:
    messages = conversation(3000)
    counting = Counting(tiny_lm.chat)
    ids, dropped = fit_chat(counting, messages, 256, 1)
    kept = len(messages) - dropped
    assert len(ids) <= 255 and kept < 60
    # O(log n) encodings of at most about twice what is kept, and never the whole conversation
    assert counting.calls <= 2 * math.ceil(math.log2(len(messages))) + 2
    assert counting.messages <= counting.calls * 2 * kept


async def test_chat_keeps_at_most_the_history_budget_but_always_the_query(make_client: MakeClient) -> None:
    history = [[f"question {i}", f"answer {i}"] for i in range(30)]

    async def prompt_tokens(client: Any, query: str) -> int:
        body = {"query": query, "history": history, "temperature": 0, "max_tokens": 2}
        response = await client.post("/chat", json=body)
        assert response.status == 200
        return int((await response.json())["usage"]["prompt_tokens"])

    budgeted, unlimited = (
        await make_client(limits=Limits(history_tokens=60)),
        await make_client(limits=Limits(history_tokens=None)),
    )
    assert await prompt_tokens(budgeted, "and?") <= 60 < await prompt_tokens(unlimited, "and?")
    assert await prompt_tokens(budgeted, "word " * 80) > 60  # a query over the budget is answered, alone


# ---- the event loop only does I/O ------------------------------------------------------------------


async def stream_gaps(client: Any, body: dict[str, Any], started: asyncio.Event) -> list[float]:
    times = []
    async with client.post("/stream", json=body) as resp:
        async for line in resp.content:
            if line.startswith(b"data: "):
                times.append(time.perf_counter())
                started.set()
    return times


@pytest.mark.parametrize("route", ["/chat", "/v1/chat/completions"])
async def test_a_huge_conversation_does_not_stall_other_clients(route: str, make_client: MakeClient) -> None:
    client = await make_client()
    started = asyncio.Event()
    body = {"query": "tell me", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    stream = asyncio.create_task(stream_gaps(client, body, started))
    await started.wait()
    if route == "/chat":
        big: dict[str, Any] = {"query": "hi", "history": [[f"q{i} " * 5, f"a{i} " * 5] for i in range(3000)]}
    else:
        chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i} " * 5} for i in range(6000)]
        big = {"messages": [*chat, {"role": "user", "content": "hi"}]}
    assert len(json.dumps(big)) > 90_000
    sent = time.perf_counter()
    answer = asyncio.create_task(client.post(route, json={**big, "max_tokens": 4}))
    health = []
    while not answer.done():
        start = time.perf_counter()
        assert (await client.get("/health")).status == 200
        health.append(time.perf_counter() - start)
        await asyncio.sleep(0.01)
    resp = await answer
    took = time.perf_counter() - sent
    # the chat route trims the history to fit; the OpenAI route refuses a conversation over the context
    assert resp.status == (200 if route == "/chat" else 400)
    assert took < 5.0 and max(health) < 0.5
    times = await stream
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < max(1.0, 20 * statistics.median(gaps))


@pytest.mark.parametrize("route", ["/chat", "/stream"])
async def test_a_history_is_made_into_messages_and_sent_back_off_the_event_loop(
    route: str, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # within the 1 MiB body limit a history holds some 45,000 rounds: its messages and the answer that sends it back
    # took about 0.1 s each on the event loop, keeping every other request waiting meanwhile
    client = await make_client()
    loop_thread, made, encoded = threading.current_thread(), [], []
    messages = api.chatglm_web.chatglm_messages

    def made_on_a_thread(*args: Any) -> Any:
        made.append(threading.current_thread())
        return messages(*args)

    def encoded_on_a_thread(obj: Any) -> str:
        if isinstance(obj, dict) and "history" in obj:
            encoded.append(threading.current_thread())
        return dumps(obj)

    monkeypatch.setattr(api.chatglm_web, "chatglm_messages", made_on_a_thread)
    monkeypatch.setattr(api.chatglm_web, "dumps", encoded_on_a_thread)
    monkeypatch.setattr(api.http, "dumps", encoded_on_a_thread)
    history = [[f"q{i}", f"a{i}"] for i in range(50)]
    resp = await client.post(route, json={"query": "hi", "history": history, "max_tokens": 2})
    assert resp.status == 200
    text = await resp.text()
    last = json.loads(text if route == "/chat" else text.strip().split("data: ")[-1])
    assert last["history"][:50] == history and last["history"][-1][0] == "hi"
    assert made and encoded and loop_thread not in made + encoded


# ---- chunked prefill ------------------------------------------------------------------------------


def test_chunks_shrink_as_attention_grows_and_depend_only_on_the_prompt() -> None:
    sizes = [chunk_size(512, offset, 1500) for offset in (0, 512, 2000, 8000, 100_000)]
    assert sizes[0] == 512 and sizes == sorted(sizes, reverse=True) and sizes[-1] == 16
    for offset, size in zip((0, 512, 2000, 8000), sizes, strict=False):  # about the cost of a chunk at the start
        assert 0.9 < size * (1500 + offset) / (512 * 1500) < 1.1


class Recorder(Wrapped):
    """Records each forward pass's batch and length, optionally slowed down."""

    def __init__(self, model: Any, delay: float = 0.0, per_token: float = 0.0) -> None:
        super().__init__(model)
        self.delay, self.per_token = delay, per_token
        self.calls: list[tuple[int, int]] = []  # (batch, new tokens)

    def forward(self, **kwargs: Any) -> Any:
        ids = kwargs["input_ids"]
        self.calls.append((ids.shape[0], ids.shape[1]))
        time.sleep(self.delay + self.per_token * ids.numel())
        return self.model(**kwargs)


@pytest.fixture(scope="module")
def long_lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = build_tiny_model(tmp_path_factory.mktemp("long"), context=8192)
    return load_model(ModelConfig(path=folder, device="cpu", dtype="float32"))


LONG_PROMPT = "The keeper counted ships. " * 150  # about 900 tokens of the tiny vocabulary


async def test_a_long_prompt_is_prefilled_between_decode_steps(make_client: MakeClient, long_lm: LoadedModel) -> None:
    import dataclasses

    recorder = Recorder(long_lm.model)
    client = await make_client(dataclasses.replace(long_lm, model=recorder, lean_decode=False), prefill_chunk=128)
    started = asyncio.Event()
    running = asyncio.create_task(stream_gaps(client, {"query": "go", "max_tokens": 400, "ignore_eos": True}, started))
    await started.wait()
    mark = len(recorder.calls)
    long = await client.post("/chat", json={"query": LONG_PROMPT, "temperature": 0, "max_tokens": 8})
    assert long.status == 200 and (await long.json())["usage"]["prompt_tokens"] > 600
    calls = recorder.calls[mark:]
    chunks = [i for i, (batch, n) in enumerate(calls) if n > 1]
    assert len(chunks) >= 5 and all(calls[i][1] <= 128 for i in chunks)
    # a decode step of the running stream between every two chunks
    assert all(any(calls[j] == (1, 1) for j in range(a + 1, b)) for a, b in itertools.pairwise(chunks))
    running.cancel()


@pytest.mark.parametrize("lm_name", ["long_lm", "bundled_fp32"])
async def test_chunked_prefill_gives_the_one_piece_answer(
    lm_name: str, make_client: MakeClient, request: pytest.FixtureRequest
) -> None:
    lm: LoadedModel = request.getfixturevalue(lm_name)
    # about 400 prompt tokens on either model, so 96-token chunks cut it in five
    query = LONG_PROMPT if lm_name == "long_lm" else "The keeper counted ships. " * 65
    body = {"query": query, "temperature": 0, "max_tokens": 16, "ignore_eos": True}
    answers = []
    for chunk in (0, 96):
        client = await make_client(lm, prefill_chunk=chunk)
        # beside another request, so the chunks really interleave with decode steps
        other = asyncio.create_task(client.post("/chat", json={"query": "hi", "max_tokens": 24, "ignore_eos": True}))
        answers.append((await (await client.post("/chat", json=body)).json())["response"])
        await other
    assert answers[0] == answers[1] and answers[0]


async def test_slow_prefill_takes_smaller_chunks(make_client: MakeClient, long_lm: LoadedModel) -> None:
    """Where a prompt's tokens take long to prefill, a step prefills fewer of them than --prefill-chunk while other
    streams decode, so that they wait about --prefill-seconds, not a whole chunk's time; with none decoding, a step
    takes whole chunks (nobody waits for it)."""
    import dataclasses

    recorder = Recorder(long_lm.model, per_token=0.001)  # a millisecond a token, as on a slow CPU
    # attention as cheap as the rest (the recorder's cost does not grow deeper in): chunks keep their size
    slow = dataclasses.replace(long_lm, model=recorder, lean_decode=False, attention_break_even=1 << 20)
    # no prefix cache: the same prompt again is prefilled again, in the chunks this test is about
    client = await make_client(slow, prefill_chunk=256, prefill_seconds=0.12, prefix_cache_mb=0)
    alone = await client.post("/chat", json={"query": LONG_PROMPT, "max_tokens": 2})
    assert alone.status == 200
    whole = [n for _, n in recorder.calls if n > 1]
    assert whole[:3] == [256, 256, 256]
    recorder.calls.clear()
    started = asyncio.Event()
    running = asyncio.create_task(stream_gaps(client, {"query": "go", "max_tokens": 300, "ignore_eos": True}, started))
    await started.wait()
    response = await client.post("/chat", json={"query": LONG_PROMPT, "max_tokens": 2})
    assert response.status == 200
    chunks = [n for _, n in recorder.calls if n > 1][1:]  # after the running stream's own prompt
    assert len(chunks) >= 5 and all(60 <= n <= 160 for n in chunks[:-1])  # about 120 tokens: 0.12 s
    health = await (await client.get("/health")).json()
    assert 60 <= health["prefill_tokens_per_step"] <= 160
    running.cancel()


async def test_a_request_cancelled_between_chunks_frees_its_slot(make_client: MakeClient, long_lm: LoadedModel) -> None:
    import dataclasses

    recorder = Recorder(long_lm.model, delay=0.05)
    client = await make_client(dataclasses.replace(long_lm, model=recorder, lean_decode=False), prefill_chunk=64)
    engine = client.app[BACKEND]
    task = asyncio.create_task(client.post("/chat", json={"query": LONG_PROMPT, "max_tokens": 8}))
    await wait_until(lambda: sum(n > 1 for _, n in recorder.calls) >= 2)
    assert engine.counts == (1, 0)
    task.cancel()
    await wait_until(lambda: engine.counts == (0, 0), within=2.0)
    chunks = sum(n > 1 for _, n in recorder.calls)
    await asyncio.sleep(0.3)
    assert sum(n > 1 for _, n in recorder.calls) <= chunks + 1  # no more chunks of a prompt nobody waits for
    resp = await client.post("/chat", json={"query": "hi", "max_tokens": 3, "ignore_eos": True})
    assert resp.status == 200  # the slot is free again


async def test_a_short_request_does_not_wait_behind_a_long_one(make_client: MakeClient, long_lm: LoadedModel) -> None:
    """While one long prompt is prefilled in chunks and a second waits for its turn, a short request that comes
    after both is answered within a few steps, before the first long one is."""
    import dataclasses

    recorder = Recorder(long_lm.model, delay=0.05)
    client = await make_client(dataclasses.replace(long_lm, model=recorder, lean_decode=False), prefill_chunk=64)
    engine = client.app[BACKEND]
    first = asyncio.create_task(client.post("/chat", json={"query": LONG_PROMPT, "max_tokens": 2}))
    await wait_until(lambda: sum(n > 1 for _, n in recorder.calls) >= 2)
    second = asyncio.create_task(client.post("/chat", json={"query": LONG_PROMPT + "again", "max_tokens": 2}))
    await wait_until(lambda: engine.counts == (1, 1))
    short = await client.post("/chat", json={"query": "hi", "max_tokens": 3, "ignore_eos": True})
    assert short.status == 200 and not first.done()
    assert (await first).status == 200 and (await second).status == 200


# ---- start-up ------------------------------------------------------------------------------------


def test_a_port_in_use_is_one_line_before_any_model_loads(tiny_dir: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        result = run_cli("--model", str(tiny_dir), "--device", "cpu", "--port", str(port))
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"error: --port {port}: address 127.0.0.1:{port} is already in use (another server?)"
    )
    assert "loading" not in result.stdout + result.stderr and time.monotonic() - start < 30
