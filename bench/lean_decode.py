"""An experiment, not a feature: would a decode step written as plain functions (no transformers modules, the same
tensor operations over the same weights) be faster than transformers' own forward pass? On the bundled model at its
defaults, one row, 100 cached tokens, both alternated in one process; also checks that both give the same logits.

    .venv/bin/python bench/lean_decode.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import batch  # noqa: E402
from loader import ModelConfig, bundled_model_path, load_model  # noqa: E402


def lean_step(lm: Any, token: int, position: int, cache: Any) -> torch.Tensor:
    """One Llama decode step for one row: next-token logits [1, V]; appends to `cache` as the model would."""
    m, config = lm.model.model, lm.model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)).to(x.dtype)

    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + torch.cat((-x[..., dim // 2 :], x[..., : dim // 2]), dim=-1) * sin

    x = m.embed_tokens(torch.tensor([[token]]))  # [1, 1, hidden]
    cos, sin = m.rotary_emb(x, torch.tensor([[position]]))
    cos, sin = cos[:, None], sin[:, None]
    for i, layer in enumerate(m.layers):
        attn, mlp = layer.self_attn, layer.mlp
        h = norm(x, layer.input_layernorm.weight)
        q = rope(attn.q_proj(h).view(1, 1, heads, dim).transpose(1, 2), cos, sin)
        k = rope(attn.k_proj(h).view(1, 1, kv_heads, dim).transpose(1, 2), cos, sin)
        v = attn.v_proj(h).view(1, 1, kv_heads, dim).transpose(1, 2)
        keys, values = cache.layers[i].update(k, v)
        a = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), enable_gqa=True).to(x.dtype)
        x = x + attn.o_proj(a.transpose(1, 2).reshape(1, 1, heads * dim))
        h = norm(x, layer.post_attention_layernorm.weight)
        x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
    logits: torch.Tensor = lm.model.lm_head(norm(x, m.norm.weight))[:, -1].float()
    return logits


def main() -> None:
    lm = load_model(ModelConfig(path=bundled_model_path()))
    prompt, steps = list(range(100, 200)), 50
    with torch.inference_mode():
        for _ in range(2):
            _, cache = batch.prefill_chunk(lm, prompt, None)
            kv = batch.KVBatch()
            kv.add(cache, torch.ones(1, len(prompt), dtype=torch.long))
            for _ in range(5):
                batch.decode_step(lm, kv, [5])
            start = time.perf_counter()
            for _ in range(steps):
                batch.decode_step(lm, kv, [5])
            hf = (time.perf_counter() - start) / steps * 1000
            _, cache = batch.prefill_chunk(lm, prompt, None)
            for i in range(5):
                lean_step(lm, 5, len(prompt) + i, cache)
            start = time.perf_counter()
            for i in range(steps):
                lean_step(lm, 5, len(prompt) + 5 + i, cache)
            lean = (time.perf_counter() - start) / steps * 1000
            print(f"decode step: transformers {hf:.2f} ms, plain functions {lean:.2f} ms", flush=True)
        _, first = batch.prefill_chunk(lm, prompt, None)
        _, second = batch.prefill_chunk(lm, prompt, None)
        kv = batch.KVBatch()
        kv.add(first, torch.ones(1, len(prompt), dtype=torch.long))
        diff = (batch.decode_step(lm, kv, [5]) - lean_step(lm, 5, len(prompt), second)).abs().max()
        print(f"largest logit difference: {float(diff)}")


if __name__ == "__main__":
    main()
