"""Attention on a CPU: in float32 whatever the model's precision, and a prompt's chunk after its cache unmasked.

PyTorch's CPU `scaled_dot_product_attention` is several times slower in bf16 than in float32, at one row and at a decode
batch (`bench/cpu_kernels.py`; the figures are in bench/README.md), so on a CPU a bf16/fp16 model keeps its keys and
values in float32 and attends in float32; only the query is cast. The cache costs twice the memory per token (the batch
size chosen from memory accounts for it) and is more precise than bf16 (generation/kv_cache.py). float32 models take the
same path for the rest: a cache that grows in place, and a chunk of a long prompt attending to the cache before it
without a mask (`_attend_after_cache`). Models whose attention goes through transformers' attention interface get this
by name (`FP32_SDPA`), ChatGLM2/3 and GLM-4 too (they run as GlmForCausalLM); ChatGLM-6B keeps its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

FP32_SDPA = "sdpa_fp32"

log = logging.getLogger(__name__)


def attend_fp32(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, L, D] in the model's dtype
    key: torch.Tensor,  # [B, Hkv, T, D] float32 from a kvcache.Fp32Layer (or the model's dtype without a cache)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention computed in float32; the output [B, L, H, D] in the query's dtype. Without a
    mask (see `causal_mask`) the queries are the last L of the T tokens, each seeing those up to itself."""
    q, k, v = query.float(), key.float(), value.float()
    length, total = q.shape[2], k.shape[2]
    if attention_mask is None and 1 < length < total and kwargs.get("position_bias") is None:
        out = _attend_after_cache(q, k, v, kwargs.get("scaling"))
        if out is not None:
            return out.transpose(1, 2).contiguous().to(query.dtype), None
        attention_mask = torch.ones((length, total), dtype=torch.bool, device=q.device).tril(total - length)[None, None]
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, _ = sdpa_attention_forward(module, q, k, v, attention_mask, **kwargs)
    return out.to(query.dtype), None


def _attend_after_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor | None:
    """A prompt's chunk [B, H, L, D] attending to the T − L cached tokens before it and, causally, to itself; None
    where the CPU flash kernel is not there.

    Done as two unmasked flash-attention calls merged by their log-sum-exps, which is the same softmax: a mask over
    the cached part costs its full size, and the kernel works in bigger blocks with more query rows, so the query
    heads sharing a key head go as one sequence (`bench/chunked_prefill.py` compares it with a masked chunk)."""
    if q.device.type != "cpu":
        return None
    b, heads, length, dim = q.shape
    kv_heads, before = k.shape[1], k.shape[2] - length
    groups = heads // kv_heads
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    try:
        # the cached tokens: every query sees all of them
        packed = q.reshape(b, kv_heads, groups * length, dim)
        old, old_lse = flash(packed, k[:, :, :before], v[:, :, :before], scale=scale)[:2]
        # the chunk's own tokens: causal, queries and keys aligned
        own_k = k[:, :, before:].repeat_interleave(groups, dim=1)
        own_v = v[:, :, before:].repeat_interleave(groups, dim=1)
        new, new_lse = flash(q, own_k, own_v, is_causal=True, scale=scale)[:2]
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        log.debug("split chunk attention unavailable: %s", exc)
        return None
    # softmax over both parts: each part's output weighted by its share of the total exp-sum
    share = torch.sigmoid(old_lse.reshape(b, heads, length) - new_lse)[..., None]  # [B, H, L, 1]
    out: torch.Tensor = new + share * (old.reshape(b, heads, length, dim) - new)
    return out  # [B, H, L, D]


def causal_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' SDPA mask, except that a plain causal one without padding whose queries are the last tokens is
    None at every query length (SDPA's own mask skips only where queries and keys are as many, or one query):
    `attend_fp32` then attends to the cache and the chunk without materializing it."""
    plain = attention_mask is None and mask_function is causal_mask_function and allow_is_causal_skip
    if plain and kv_offset == 0 and q_offset + q_length == kv_length:
        return None
    return sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=allow_is_causal_skip,
        **kwargs,
    )


def fp32_attention(model: Any, device: str, dtype: torch.dtype) -> bool:
    """Switch a model on a CPU from SDPA to this module's float32 SDPA; whether it was switched.

    Only a model that runs SDPA through the attention interface is switched (its config says "sdpa")."""
    if device != "cpu" or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(FP32_SDPA, attend_fp32)
    AttentionMaskInterface.register(FP32_SDPA, causal_mask)
    model.set_attn_implementation(FP32_SDPA)
    return True
