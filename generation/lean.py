"""A decode step for Llama-style models as plain functions over the model's own weights and modules' parameters.

transformers' forward pass wraps each decode step in module calls, output records, mask building and checks, which
on a CPU are a good part of a small model's step: the same tensor operations written as functions make a step of
the bundled model markedly faster (`bench/lean_decode.py`, figures in bench/README.md). Only decode steps (one new
token a row) on a CPU take this path; prefill stays with transformers. A model takes it only when its layers have
the Llama shape (attention q/k/v/o projections, a gated MLP, RMSNorm before each) and one step agrees with
transformers' own at load (`agrees`), so an architecture that differs in anything this code does not do (partial
rotary, another norm, another activation) keeps transformers' path. Where a third or more of the batch is padding
(one long prompt among short ones), each row attends to its own tokens only, one call a row, instead of every row
reading the longest row's width.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F

from generation.kv_cache import new_cache
from models.fusion import fuse_outputs
from models.llama_layout import ATTENTION as _ATTENTION
from models.llama_layout import MLP as _MLP
from models.llama_layout import supports
from models.quantize import QuantizedLinear

log = logging.getLogger(__name__)

Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Layer:
    """One decoder layer as the plain step calls it: its norms' weights and projections, looked up once (a module's
    attributes go through nn.Module.__getattr__, a microsecond each, a dozen a layer)."""

    norm: tuple[torch.Tensor, float]  # the input RMSNorm's weight and epsilon
    qkv: Linear | None  # q, k and v as one call (None: apart)
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    post: tuple[torch.Tensor, float]
    gate_up: Linear | None  # gate and up as one call (None: apart)
    gate: Linear
    up: Linear
    down: Linear
    scaling: float
    dim: int


@dataclass(frozen=True)
class _Plan:
    layers: list[_Layer]
    norm: tuple[torch.Tensor, float]
    head: Linear
    heads: int
    kv_heads: int


_PLANS: weakref.WeakKeyDictionary[Any, _Plan] = weakref.WeakKeyDictionary()


def prepare(model: Any, fuse: bool = True, bind: bool = True) -> None:
    """Look up what the plain step calls, once: each projection's kernel bound with its weights (`bind`,
    QuantizedLinear.few_rows) and each layer's q/k/v and gate/up as one call each (`fuse`, models/fusion.py:
    the weights stay where they are, the layers' own become views of the fused ones). Done at load by `agrees`;
    again after a layer's weights or route change."""
    config = model.config
    heads = config.num_attention_heads
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        # q, k, v, o and down keep their kernel's dtype (see `step`); gate and up are cast back for the activation
        qkv = fuse_outputs([attn.q_proj, attn.k_proj, attn.v_proj], cast_back=False) if fuse else None
        gate_up = fuse_outputs([mlp.gate_proj, mlp.up_proj]) if qkv is not None else None
        if gate_up is None:
            qkv = None
        q, k, v, o = (_linear(getattr(attn, n), bind, cast_back=False) for n in _ATTENTION)
        gate, up = (_linear(getattr(mlp, n), bind) for n in _MLP[:2])
        down = _linear(mlp.down_proj, bind, cast_back=False)
        norm, post = _norm_of(layer.input_layernorm), _norm_of(layer.post_attention_layernorm)
        layers.append(_Layer(norm, qkv, q, k, v, o, post, gate_up, gate, up, down, attn.scaling, attn.head_dim))
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    _PLANS[model] = _Plan(layers, _norm_of(model.model.norm), _linear(model.lm_head, bind), heads, kv_heads)


def _linear(module: Any, bind: bool = True, cast_back: bool = True) -> Linear:
    """A layer as a plain function: a quantized one's bound kernel (`cast_back`: see QuantizedLinear.few_rows),
    else the matmul on its own weights (or, with `bind` off, the module itself)."""
    if not bind:
        return cast(Linear, module)
    if type(module) is QuantizedLinear:
        return module.few_rows(cast_back)
    return partial(F.linear, weight=module.weight, bias=module.bias)


def _norm_of(module: Any) -> tuple[torch.Tensor, float]:
    return module.weight, float(module.variance_epsilon)


def _norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    """RMSNorm in float32, as Llama's: weight · (x / rms(x)) in the input's dtype. A float32 model takes PyTorch's
    own op, one call instead of seven, with the same result."""
    weight, eps = norm
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out: torch.Tensor = weight * normed.to(x.dtype)
    return out


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., D] with its first half negated, once a step: with it, rotating halves is a roll (see `_rope`)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotating halves ([B, H, 1, D] with cos and `_signed(sin)` [B, 1, 1, D]): x·cos + (−x₂, x₁)·sin
    is x·cos + roll(x)·(−sin₁, sin₂), the same products, in three operations instead of six. x may be in the
    kernel's dtype: the float32 factors promote it, exactly."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def step(
    model: Any,
    input_ids: torch.Tensor,  # [B, 1]
    position_ids: torch.Tensor,  # [B, 1]
    attention_mask: torch.Tensor | None,  # [B, T] 1 real, 0 padding (T counts the new token); None: all real
    cache: Any,  # a DynamicCache with one layer per decoder layer; grows by one token
    fp32: bool,  # attend in float32 (the cache holds float32, see generation/attention.py)
) -> torch.Tensor:
    """Next-token logits [B, V] for one new token a row."""
    plan = _PLANS.get(model)
    if plan is None:
        prepare(model)
        plan = _PLANS[model]
    inner = model.model
    b, heads, kv_heads = input_ids.shape[0], plan.heads, plan.kv_heads
    x = inner.embed_tokens(input_ids)  # [B, 1, hidden]
    cos, sin = inner.rotary_emb(x, position_ids)  # [B, 1, D]
    cos, signed = cos[:, None], _signed(sin[:, None])  # [B, 1, 1, D]
    lengths = _mostly_padding(attention_mask)
    mask = None if attention_mask is None or lengths else attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
    for layer, kv in zip(plan.layers, cache.layers, strict=True):
        dim = layer.dim
        h = _norm(x, layer.norm)
        if layer.qkv is not None:  # one call for q, k and v; one rotary embedding for q and k
            qkv = layer.qkv(h).view(b, 1, heads + 2 * kv_heads, dim).transpose(1, 2)  # [B, H + 2·Hkv, 1, D]
            qk = _rope(qkv[:, : heads + kv_heads], cos, signed)
            q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
        else:
            q = _rope(layer.q(h).view(b, 1, heads, dim).transpose(1, 2), cos, signed)  # [B, H, 1, D]
            k = _rope(layer.k(h).view(b, 1, kv_heads, dim).transpose(1, 2), cos, signed)
            v = layer.v(h).view(b, 1, kv_heads, dim).transpose(1, 2)
        # q and k come out of the rotation in x's dtype or float32 (float32 factors), v in the kernel's: a float32
        # cache takes them as they are, another in x's dtype
        if not fp32:
            k, v = k.to(x.dtype), v.to(x.dtype)
        keys, values = kv.update(k, v)  # [B, Hkv, T, D]
        query = q.float() if fp32 else q.to(x.dtype)
        if keys.dtype != query.dtype:
            keys, values = keys.to(query.dtype), values.to(query.dtype)
        if lengths:
            a = _attend_rows(query, keys, values, lengths, layer.scaling).to(x.dtype)
        else:
            a = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=layer.scaling, enable_gqa=True
            ).to(x.dtype)
        x = x + layer.o(a.transpose(1, 2).reshape(b, 1, heads * dim))  # promoted to x's dtype
        h = _norm(x, layer.post)
        if layer.gate_up is not None:
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
        else:
            gate, up = layer.gate(h), layer.up(h)
        x = x + layer.down(F.silu(gate) * up)
    logits: torch.Tensor = plan.head(_norm(x, plan.norm))[:, -1].float()
    return logits


def _mostly_padding(attention_mask: torch.Tensor | None) -> list[int]:
    """Each row's real tokens (the last ones of its T) where padding is a third or more of the batch's [B, T]
    positions, else []: then attending row by row to the real tokens only reads less than the padded batch does
    (one long prompt among short ones makes every row as wide as it is)."""
    if attention_mask is None:
        return []
    lengths: list[int] = attention_mask.sum(dim=1).tolist()
    return lengths if 2 * attention_mask.numel() >= 3 * sum(lengths) else []


def _attend_rows(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: list[int], scale: float
) -> torch.Tensor:
    """[B, H, 1, D] queries, each against the last `lengths[i]` of its row's keys [B, Hkv, T, D]; [B, H, 1, D]."""
    t = keys.shape[2]
    rows = [
        F.scaled_dot_product_attention(
            query[i : i + 1], keys[i : i + 1, :, t - n :], values[i : i + 1, :, t - n :], scale=scale, enable_gqa=True
        )
        for i, n in enumerate(lengths)
    ]
    return torch.cat(rows)


def agrees(model: Any, fp32: bool, device: str) -> bool:
    """Whether decode steps of two rows, the second padded, give transformers' logits; run once at load, with a
    little padding (the padded attention) and with much (row by row). The projections are fused first, so the check
    covers the step as it will run."""
    if not supports(model):
        return False
    prepare(model)
    return all(_agrees(model, fp32, device, pad) for pad in (1, 4))


def _agrees(model: Any, fp32: bool, device: str, pad: int) -> bool:
    vocab = model.config.vocab_size
    first = [(1 + i) % vocab for i in range(5)]
    ids = torch.tensor([first, [0] * pad + first[pad:]], device=device)
    mask = torch.tensor([[1] * 5, [0] * pad + [1] * (5 - pad)], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        with torch.inference_mode():
            prefilled = []
            for _ in range(2):
                cache = new_cache(model, fp32)  # None: the model makes its own, as in batch.prefill
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
                prefilled.append(out.cache)
            token = torch.tensor([[6 % vocab], [7 % vocab]], device=device)
            position = positions[:, -1:] + 1
            grown = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
            want = (
                model(input_ids=token, attention_mask=grown, position_ids=position, cache=prefilled[0], use_cache=True)
                .logits[:, -1]
                .float()
            )
            got = step(model, token, position, grown, prefilled[1], fp32)
    except Exception as exc:  # a layer this code misreads: transformers' path it is
        log.info("plain decode step unavailable: %s", exc)
        return False
    scale = float(want.abs().max()) or 1.0
    return bool(torch.allclose(got, want, rtol=1e-2, atol=2e-2 * scale))
