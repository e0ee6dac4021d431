"""The prefix cache through the server: a conversation's history is prefilled once, and answers stay exactly what they
are without it (float32, greedy) for prompts that hit fully, partly and not at all, alone and in a batch, prefilled
whole or in chunks, on a quantized model; a tiny budget, a cancelled prefill, `/clear`, and the counters."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from typing import Any

import pytest

from api.config import BACKEND
from backends.local import LocalBackend
from generation.prefix_cache import BLOCK
from generation.prepare import load_model
from models.loader import LoadedModel, ModelConfig
from tests.conftest import LiveServer, MakeClient, build_tiny_gguf
from tests.helpers import wait_until

SYSTEM = {"role": "system", "content": "You answer questions about the sea."}
QUESTIONS = [
    "Why is the sea salty?",
    "And why is the sky over it blue on a clear day?",
    "What makes waves on a calm evening?",
]


async def served(client: Any) -> str:
    name: str = (await (await client.get("/v1/models")).json())["data"][0]["id"]
    return name


async def ask(client: Any, messages: list[dict[str, str]], max_tokens: int = 10) -> tuple[str, dict[str, Any]]:
    """The greedy answer to a conversation and its usage."""
    body = {
        "model": await served(client),
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()
    out = await resp.json()
    return out["choices"][0]["message"]["content"], out["usage"]


async def prompt_ids(client: Any, messages: list[dict[str, str]]) -> list[int]:
    resp = await client.post("/tokenize", json={"model": await served(client), "messages": messages})
    tokens: list[int] = (await resp.json())["tokens"]
    return tokens


async def converse(client: Any, opening: str, rounds: int = 3) -> list[tuple[str, dict[str, Any], list[int]]]:
    """A conversation that resends its history every round: each round's answer, usage and prompt ids."""
    messages = [SYSTEM]
    out = []
    for question in [opening, *QUESTIONS][:rounds]:
        messages.append({"role": "user", "content": question})
        ids = await prompt_ids(client, messages)
        answer, usage = await ask(client, messages)
        out.append((answer, usage, ids))
        messages.append({"role": "assistant", "content": answer})
    return out


def shared_blocks(a: list[int], b: list[int]) -> int:
    """Tokens of `b` in whole blocks that a prefix cache holding `a` serves: their common prefix, short of b's last
    token."""
    same = 0
    while same < min(len(a), len(b) - 1) and a[same] == b[same]:
        same += 1
    return same // BLOCK * BLOCK


def cached(usage: dict[str, Any]) -> int:
    return int(usage["prompt_tokens_details"]["cached_tokens"])


@pytest.mark.parametrize("prefill_chunk", [0, 16], ids=["whole", "chunked"])
async def test_a_conversation_reuses_its_history_and_answers_the_same(
    make_client: MakeClient, prefill_chunk: int
) -> None:
    without = await converse(await make_client(prefix_cache_mb=0, prefill_chunk=prefill_chunk), "Hello there!")
    client = await make_client(prefix_cache_mb=64, prefill_chunk=prefill_chunk)
    rounds = await converse(client, "Hello there!")
    assert [a for a, _, _ in rounds] == [a for a, _, _ in without]
    assert all("prompt_tokens_details" not in u for _, u, _ in without)  # no prefix cache: nothing said
    assert cached(rounds[0][1]) == 0  # nothing to reuse yet
    for (_, _, before), (_, usage, ids) in itertools.pairwise(rounds):
        # at least the whole blocks of the last round's prompt; it also holds the last answer
        assert cached(usage) >= shared_blocks(before, ids) > 0
        assert cached(usage) < usage["prompt_tokens"]
    # the same question again: all of it but the last block's tail
    messages = [SYSTEM, {"role": "user", "content": "Hello there!"}]
    answer, usage = await ask(client, messages)
    assert answer == without[0][0] and cached(usage) == (usage["prompt_tokens"] - 1) // BLOCK * BLOCK


async def test_conversations_in_one_batch_answer_as_they_do_alone(make_client: MakeClient) -> None:
    openings = ["Hello there!", "Good morning to you.", "Hi!", "Tell me about tides."]
    alone = await make_client(prefix_cache_mb=0, max_batch_size=1)
    expected = [await converse(alone, o) for o in openings]
    client = await make_client(prefix_cache_mb=64, max_batch_size=8)
    together = await asyncio.gather(*(converse(client, o) for o in openings))
    assert [[a for a, _, _ in c] for c in together] == [[a for a, _, _ in c] for c in expected]
    assert all(cached(u) > 0 for c in together for _, u, _ in c[1:])


async def test_a_quantized_model_answers_the_same_with_the_cache(
    make_client: MakeClient, tmp_path_factory: pytest.TempPathFactory
) -> None:
    gguf = build_tiny_gguf(tmp_path_factory.mktemp("q4prefix"), "Q4_1")
    lm = load_model(ModelConfig(path=gguf, device="cpu", dtype="float32", quantize=4))
    assert lm.bits == 4
    without = await converse(await make_client(lm, prefix_cache_mb=0), "Hello there!")
    rounds = await converse(await make_client(lm, prefix_cache_mb=64), "Hello there!")
    assert [a for a, _, _ in rounds] == [a for a, _, _ in without]
    assert cached(rounds[-1][1]) > 0


async def test_a_tiny_budget_forgets_old_blocks_while_requests_run(make_client: MakeClient) -> None:
    openings = [f"Conversation number {i}, about the sea." for i in range(6)]
    alone = await make_client(prefix_cache_mb=0)
    expected = [await converse(alone, o, rounds=2) for o in openings]
    client = await make_client(prefix_cache_mb=0.05, max_batch_size=4)  # a few blocks of the tiny model
    together = await asyncio.gather(*(converse(client, o, rounds=2) for o in openings))
    assert [[a for a, _, _ in c] for c in together] == [[a for a, _, _ in c] for c in expected]
    health = await (await client.get("/health")).json()
    store = health["prefix_cache"]
    assert 0 < store["bytes"] <= store["budget_bytes"] == int(0.05 * 2**20)
    assert store["blocks"] * BLOCK < sum(u["prompt_tokens"] for c in together for _, u, _ in c)  # it forgot some
    assert sum(cached(u) for c in together for _, u, _ in c) == store["hit_tokens"] > 0  # and served some


async def test_a_prefill_cancelled_midway_leaves_its_finished_chunks(
    make_client: MakeClient, slow_lm: LoadedModel
) -> None:
    messages = [SYSTEM, {"role": "user", "content": " ".join(QUESTIONS * 2)}]
    expected, _ = await ask(await make_client(prefix_cache_mb=0), messages, 8)
    client = await make_client(slow_lm, prefix_cache_mb=64, prefill_chunk=16)  # 20 ms a chunk
    body = {"model": await served(client), "messages": messages, "temperature": 0, "max_tokens": 8, "ignore_eos": True}
    backend = client.app[BACKEND]
    assert isinstance(backend, LocalBackend)
    engine = backend.engine
    request = asyncio.create_task(client.post("/v1/chat/completions", json=body))
    await wait_until(lambda: (s := engine._sched.chunking) is not None and s.prefilled >= 3 * BLOCK)
    request.cancel()
    await wait_until(lambda: engine.counts == (0, 0))
    # the worker copies the finished chunks into the cache after it ends the request, block by block
    await wait_until(lambda: engine.prefix is not None and len(engine.prefix) >= 3)
    answer, usage = await ask(client, messages, 8)
    assert answer == expected and cached(usage) >= 3 * BLOCK


async def test_clear_empties_the_cache(make_client: MakeClient) -> None:
    client = await make_client(prefix_cache_mb=64)
    messages = [SYSTEM, {"role": "user", "content": "Hello there, how are you today?"}]
    await ask(client, messages)
    backend = client.app[BACKEND]
    assert isinstance(backend, LocalBackend) and backend.engine.prefix is not None
    prefix = backend.engine.prefix
    # kept after the answer's last event went out, block by block: the worker is done once the row left the batch
    await wait_until(lambda: backend.engine._sched.idle)
    held = (await (await client.get("/health")).json())["prefix_cache"]["bytes"]
    assert held == prefix.bytes > 0
    cleared = await (await client.post("/clear")).json()
    assert cleared == {"success": True, "prefix_cache_freed_bytes": held}
    assert (await (await client.get("/health")).json())["prefix_cache"]["bytes"] == 0
    _, usage = await ask(client, messages)
    assert cached(usage) == 0


async def test_usage_metrics_and_access_log_count_cached_tokens(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="access")
    client = await make_client(prefix_cache_mb=64)
    rounds = await converse(client, "Hello there!")
    hits = sum(cached(u) for _, u, _ in rounds)
    prompts = sum(u["prompt_tokens"] for _, u, _ in rounds)
    assert hits > 0
    metrics = await (await client.get("/metrics")).text()
    assert f"chat_prefix_cache_hit_tokens_total {float(hits)}" in metrics
    assert f"chat_prefix_cache_query_tokens_total {float(prompts)}" in metrics
    logged = [r.getMessage() for r in caplog.records if r.name == "access" and "/v1/chat/completions" in r.getMessage()]
    assert [f"cached={cached(u)} " in line for (_, u, _), line in zip(rounds, logged, strict=True)] == [True] * 3
    # streamed: the usage chunk says so too
    messages = [SYSTEM, {"role": "user", "content": "Hello there!"}]
    body = {"model": await served(client), "messages": messages, "max_tokens": 4, "stream": True}
    body["stream_options"] = {"include_usage": True}
    text = await (await client.post("/v1/chat/completions", json=body)).text()
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    usage = chunks[-1]["usage"]
    assert cached(usage) == (usage["prompt_tokens"] - 1) // BLOCK * BLOCK > 0


async def test_a_model_that_cannot_extend_a_cache_has_none(make_client: MakeClient, glm_lm: LoadedModel) -> None:
    client = await make_client(glm_lm)
    health = await (await client.get("/health")).json()
    assert health["prefix_cache"] is None
    resp = await client.post("/chat", json={"query": "你好", "max_tokens": 4})
    assert resp.status == 200


def test_the_default_budget_is_a_share_of_what_is_left() -> None:
    from generation.prefix_cache import default_budget

    gib = 1 << 30
    assert default_budget(free=20 * gib, batch_cache=4 * gib) == 4 * gib
    assert default_budget(free=2 * gib, batch_cache=4 * gib) == 0


def test_an_upstreams_cached_tokens_reach_the_client(tiny_upstream: LiveServer) -> None:
    """Behind --upstream, the upstream's own prefix cache is reported (here: our server, as a vLLM would)."""
    model = tiny_upstream.get("/v1/models")["data"][0]["id"]
    messages = [SYSTEM, {"role": "user", "content": "A question asked twice through the proxy."}]
    body = {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0}
    tiny_upstream.post("/v1/chat/completions", body)
    again = tiny_upstream.post("/v1/chat/completions", body)["usage"]
    assert cached(again) == (again["prompt_tokens"] - 1) // BLOCK * BLOCK > 0


@pytest.mark.parametrize("kind", ["chatglm3-6b", "glm-4-9b-chat"])
async def test_chatglm3_and_glm4_reuse_a_conversation(
    kind: str, make_client: MakeClient, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.glm2 import write_checkpoint

    folder = write_checkpoint(tmp_path_factory.mktemp(kind), kind)
    lm = load_model(ModelConfig(path=folder, device="cpu", dtype="float32"))
    without = await converse(await make_client(lm, prefix_cache_mb=0), "你好，今天天气很好。")
    rounds = await converse(await make_client(lm, prefix_cache_mb=64), "你好，今天天气很好。")
    assert [a for a, _, _ in rounds] == [a for a, _, _ in without]
    assert cached(rounds[-1][1]) > 0


async def test_a_request_cancelled_while_decoding_leaves_what_it_fed(
    make_client: MakeClient, slow_lm: LoadedModel
) -> None:
    client = await make_client(slow_lm, prefix_cache_mb=64)
    backend = client.app[BACKEND]
    assert isinstance(backend, LocalBackend) and backend.engine.prefix is not None
    prefix, engine = backend.engine.prefix, backend.engine
    messages = [SYSTEM, {"role": "user", "content": "Tell me everything about the sea and its tides."}]
    body = {"model": await served(client), "messages": messages, "max_tokens": 200, "ignore_eos": True, "stream": True}
    resp = await client.post("/v1/chat/completions", json=body)
    await resp.content.readuntil(b"\n\n")  # decoding
    resp.close()
    await wait_until(lambda: engine.counts == (0, 0))
    prompt = len(await prompt_ids(client, messages))
    assert prompt >= BLOCK
    # at least its prompt's whole blocks, which the worker copies after it ends the request, block by block
    await wait_until(lambda: len(prefix) * BLOCK >= prompt // BLOCK * BLOCK)


async def test_a_broken_prefix_cache_turns_itself_off_and_answers_go_on(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import engine as engine_module

    messages = [SYSTEM, {"role": "user", "content": "Hello there, how are you today?"}]
    expected, _ = await ask(await make_client(prefix_cache_mb=0), messages)
    client = await make_client(prefix_cache_mb=64)
    await ask(client, messages)

    def broken(*args: object) -> None:
        raise RuntimeError("cannot restore")

    monkeypatch.setattr(engine_module, "restored", broken)
    with caplog.at_level(logging.ERROR, logger="engine"):
        answer, usage = await ask(client, messages)  # a hit, whose restore fails: prefilled whole instead
    assert answer == expected and "prompt_tokens_details" not in usage
    assert "prefix cache: off from now on" in caplog.text
    assert (await (await client.get("/health")).json())["prefix_cache"] is None
    assert (await ask(client, messages))[0] == expected


async def test_a_cache_in_the_models_own_dtype_is_restored_too(make_client: MakeClient, tiny_lm: LoadedModel) -> None:
    """Where attention is not moved to float32 (a GPU: the cache layers are transformers' own, in the model's dtype),
    a hit restores into transformers' cache layers; here on the CPU in float32, so answers must be the same."""
    import dataclasses

    lm = dataclasses.replace(tiny_lm, fp32_attention=False, lean_decode=False)
    without = await converse(await make_client(lm, prefix_cache_mb=0), "Hello there!")
    client = await make_client(lm, prefix_cache_mb=64)
    rounds = await converse(client, "Hello there!")
    assert [a for a, _, _ in rounds] == [a for a, _, _ in without]
    assert all(cached(usage) > 0 for _, usage, _ in rounds[1:])
