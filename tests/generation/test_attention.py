"""Models on a CPU keep their cache in float32 and attend in float32 (generation/attention.py): cache grows in place and
survives the batch's padding, merging and row selection, a prompt's chunk attends to the cache before it as a causal
mask would have it, and answers stay right."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from generation.attention import FP32_SDPA, attend_fp32, causal_mask
from generation.batch import KVBatch, decode_step, prefill_chunk
from generation.kv_cache import Fp32Layer
from generation.prepare import load_model
from models.loader import LoadedModel, ModelConfig
from tests.conftest import MakeClient


@pytest.fixture(scope="module")
def bf16_lm(tiny_dir: Path) -> LoadedModel:
    return load_model(ModelConfig(path=tiny_dir, device="cpu", dtype="bfloat16"))


def test_models_on_a_cpu_attend_in_float32(bf16_lm: LoadedModel, tiny_lm: LoadedModel) -> None:
    assert bf16_lm.fp32_attention and bf16_lm.model.config._attn_implementation == FP32_SDPA
    assert tiny_lm.fp32_attention and tiny_lm.model.config._attn_implementation == FP32_SDPA


def test_the_cache_grows_in_place_and_takes_assigned_rows() -> None:
    layer = Fp32Layer()
    parts = [torch.randn(2, 3, n, 8, dtype=torch.bfloat16) for n in (5, 1, 70, 1, 1)]  # past the spare room
    for i, part in enumerate(parts):
        keys, values = layer.update(part, -part)
        want = torch.cat(parts[: i + 1], dim=2).float()
        assert keys.dtype == torch.float32 and torch.equal(keys, want) and torch.equal(values, -want)
    assert layer.get_seq_length() == 78
    layer.keys, layer.values = keys[1:], values[1:]  # as generation/batch.py keeps rows
    extra = torch.randn(1, 3, 1, 8)
    keys, _ = layer.update(extra, extra)
    assert keys.shape == (1, 3, 79, 8) and torch.equal(keys, torch.cat([want[1:], extra], dim=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chunk_attends_to_its_cache_as_the_causal_mask_says(dtype: torch.dtype) -> None:
    """The queries of a chunk (the last 7 of 20 tokens; 6 query heads on 2 key heads) see every cached token and
    the chunk's tokens up to their own, exactly as SDPA with the full mask computes it."""
    torch.manual_seed(0)
    q = torch.randn(2, 6, 7, 16)
    k, v = torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    mask = torch.ones(7, 20, dtype=torch.bool).tril(13)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True).transpose(1, 2)
    got, _ = attend_fp32(torch.nn.Module(), q.to(dtype), k, v, None, scaling=0.3)
    assert got.dtype == dtype and got.shape == (2, 7, 6, 16)
    assert torch.allclose(got.float(), want, atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_only_a_plain_causal_mask_after_the_cache_is_left_out() -> None:
    def mask(**kwargs: Any) -> torch.Tensor | None:
        args: dict[str, Any] = {"batch_size": 1, "q_length": 7, "kv_length": 20, "q_offset": 13} | kwargs
        return causal_mask(**args)

    assert mask() is None and mask(q_length=1, q_offset=19) is None  # a chunk after its cache; a decode step
    padded = mask(attention_mask=torch.tensor([[0] * 3 + [1] * 17]))
    assert padded is not None and not bool(padded[0, 0, :, :3].any())  # padding is masked
    window = mask(mask_function=sliding_window_causal_mask_function(4))
    assert window is not None and not bool(window[0, 0, -1, :16].any())  # the window stays
    assert mask(mask_function=causal_mask_function, q_offset=10) is not None  # queries that are not the last


def test_a_chunked_prompts_cache_is_made_once(bf16_lm: LoadedModel) -> None:
    """Told how much of the prompt is still to come, the first chunk's cache has room for all of it: the later
    chunks write into the same buffer instead of copying the cache to a bigger one."""
    prompt = list(range(10, 310))
    with torch.inference_mode():
        _, cache = prefill_chunk(bf16_lm, prompt[:100], None, more=200)
        first = [layer._k.data_ptr() for layer in cache.layers]
        _, cache = prefill_chunk(bf16_lm, prompt[100:200], cache, more=100)
        _, cache = prefill_chunk(bf16_lm, prompt[200:], cache)
    assert [layer._k.data_ptr() for layer in cache.layers] == first
    assert cache.get_seq_length() == 300


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
