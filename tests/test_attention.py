"""Half-precision models on a CPU keep their cache in float32 and attend in float32 (attention.py): the cache grows
in place and survives the batch's padding, merging and row selection, and answers stay right."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from attention import FP32_SDPA, Fp32Layer
from batch import KVBatch, decode_step, prefill_chunk
from loader import LoadedModel, ModelConfig, load_model
from tests.conftest import MakeClient


@pytest.fixture(scope="module")
def bf16_lm(tiny_dir: Path) -> LoadedModel:
    return load_model(ModelConfig(path=tiny_dir, device="cpu", dtype="bfloat16"))


def test_only_half_precision_on_a_cpu_attends_in_float32(bf16_lm: LoadedModel, tiny_lm: LoadedModel) -> None:
    assert bf16_lm.fp32_attention and bf16_lm.model.config._attn_implementation == FP32_SDPA
    assert not tiny_lm.fp32_attention and tiny_lm.model.config._attn_implementation == "sdpa"  # float32 already


def test_the_cache_grows_in_place_and_takes_assigned_rows() -> None:
    layer = Fp32Layer()
    parts = [torch.randn(2, 3, n, 8, dtype=torch.bfloat16) for n in (5, 1, 70, 1, 1)]  # past the spare room
    for i, part in enumerate(parts):
        keys, values = layer.update(part, -part)
        want = torch.cat(parts[: i + 1], dim=2).float()
        assert keys.dtype == torch.float32 and torch.equal(keys, want) and torch.equal(values, -want)
    assert layer.get_seq_length() == 78
    layer.keys, layer.values = keys[1:], values[1:]  # as batch.py keeps rows
    extra = torch.randn(1, 3, 1, 8)
    keys, _ = layer.update(extra, extra)
    assert keys.shape == (1, 3, 79, 8) and torch.equal(keys, torch.cat([want[1:], extra], dim=2))


def test_cached_decoding_matches_recomputing_the_whole_sequence(bf16_lm: LoadedModel) -> None:
    """Every decode step's logits (through the growing float32 cache) against a forward pass over all tokens so far
    without a cache: the cache holds exactly what recomputation would."""
    prompt = list(range(10, 40))
    with torch.inference_mode():
        logits, cache = prefill_chunk(bf16_lm, prompt[:20], None)
        logits, cache = prefill_chunk(bf16_lm, prompt[20:], cache)  # a second chunk after the first
        batch = KVBatch()
        batch.add(cache, torch.ones((1, len(prompt)), dtype=torch.long))
        tokens = list(prompt)
        for _ in range(80):  # past the cache's spare room more than once
            tokens.append(int(logits[0].argmax()))
            logits = decode_step(bf16_lm, batch, tokens[-1:])
            full = bf16_lm.model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1].float()
            assert torch.allclose(logits[0], full, atol=0.05 * float(full.abs().max()))


async def test_half_precision_answers_do_not_depend_on_the_batch(bf16_lm: LoadedModel, make_client: MakeClient) -> None:
    """Prompts of different lengths padded into one batch answer as they do alone (the padding is masked in
    float32 attention)."""
    alone_client = await make_client(bf16_lm, max_batch_size=1)
    client = await make_client(bf16_lm, max_batch_size=8)
    bodies = [
        {"query": q, "temperature": 0, "max_tokens": 24, "ignore_eos": True}
        for q in ("你好", "hello there, how are you today?", "a b c d e f g h i j k l m n o p")
    ]

    async def answer(c: Any, body: dict[str, Any]) -> str:
        response = await c.post("/chat", json=body)
        assert response.status == 200
        return str((await response.json())["response"])

    alone = [await answer(alone_client, b) for b in bodies]
    assert list(await asyncio.gather(*(answer(client, b) for b in bodies))) == alone
