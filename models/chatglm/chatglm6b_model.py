"""ChatGLM-6B ("GLM v1") in plain PyTorch on transformers' base classes, from the facts in the spec (sections 3-5).

What sets it apart from a Llama-style decoder: 2D rotary positions (the prompt's positions in one half of every
head, the position inside the answer in the other), a bidirectional prefix over the prompt, a residual branch that
adds the *layer-normed* input scaled by √56, and query/key/value rows interleaved per head.

Inputs are the ones every causal LM in the engine takes: token ids, a 2D padding mask (1 real, 0 padding; rows are
left-padded) and optional 1D positions counted over each row's real tokens. The model derives the 2D positions and
the prefix mask itself, from where `<sop>` and `[gMASK]`/`[MASK]` sit in each row's prompt; the cache carries those
two per-row numbers to later decode steps (`ROW_STATE`), so a batch of rows of different lengths decodes together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from models.chatglm.chatglm6b_config import ChatGLMConfig
from models.row_state import ROW_STATE

# The residual scale: √(2·28) is a constructor default the original never overrides, whatever num_layers says.
ALPHA = math.sqrt(2 * 28)
# A finite mask value, as in the original: fully masked (padding) rows attend uniformly instead of turning to NaN,
# which would reach real rows through 0·NaN in the next layer.
MASKED = -10000.0
# Per-row numbers a cache carries for later steps, under ROW_STATE: {"context": C [B], "mask_pos": M [B]} (see
# `prompt_layout`). The batch (generation/batch.py) keeps them aligned with the cache's rows as rows join or leave.
# The original's InvalidScoreLogitsProcessor forces token 5 (`▁`) when scores are not finite.
FALLBACK_TOKEN = 5


# ---- positions and masks (spec section 4) -------------------------------------------------------


def prompt_layout(ids: torch.Tensor, real: torch.Tensor, config: ChatGLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of left-padded ids [B, S]: C, the index of the first `<sop>` (else the number of real tokens), and
    M, the index of the first `[gMASK]` (else the first `[MASK]`, else C − 1), both counted over real tokens."""
    rel = real.long().cumsum(-1) - 1  # [B, S] index among the row's real tokens

    def first(token: int | None) -> torch.Tensor:  # [B]: index of the first real `token`, −1 if absent
        hit = (ids == token) & real if token is not None else torch.zeros_like(real)
        where = rel.gather(1, hit.long().argmax(-1, keepdim=True))[:, 0]
        return torch.where(hit.any(-1), where, -1)

    context = first(config.bos_token_id)
    context = torch.where(context >= 0, context, real.sum(-1))
    gmask, mask = first(config.gmask_token_id), first(config.mask_token_id)
    mask_pos = torch.where(gmask >= 0, gmask, torch.where(mask >= 0, mask, (context - 1).clamp(min=0)))
    return context, mask_pos


def positions_2d(t: torch.Tensor, context: torch.Tensor, mask_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [B, T] and block position ids [B, T] for tokens at real-token index t [B, T]:
    the prompt counts up; from `<sop>` on the position stays at M and the block position counts 1, 2, ..."""
    after = t >= context[:, None]
    position = torch.where(after, mask_pos[:, None], t)
    block = torch.where(after, t - context[:, None] + 1, 0)
    return position, block


def attention_bias(
    real: torch.Tensor, context: torch.Tensor, past: int, length: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Additive mask [B, 1, T, K] for T new queries over K = past + T keys, or None when every key may be seen.

    A key is visible when it is real and either lies in the prompt before `<sop>` (bidirectional prefix) or does
    not come after the query (causal from `<sop>` on)."""
    keys = real.shape[1]
    if length == 1 and bool(real.all()):
        return None  # one new token after the prompt sees everything before it
    rel = real.long().cumsum(-1) - 1  # [B, K]
    query = torch.arange(past, past + length, device=real.device)[:, None]  # [T, 1]
    key = torch.arange(keys, device=real.device)[None, :]  # [1, K]
    prefix = rel < context[:, None]  # [B, K]
    seen = real[:, None, :] & (prefix[:, None, :] | (key <= query)[None])  # [B, T, K]
    zero = torch.zeros((), dtype=dtype, device=real.device)
    return torch.where(seen, zero, torch.tensor(MASKED, dtype=dtype, device=real.device))[:, None]


# ---- rotary (spec 3.4, 3.5) ----------------------------------------------------------------------


def rotary_inv_freq(rot_dim: int) -> torch.Tensor:
    """θ_j = 10000^(−2j/r) for j < r/2, rounded to fp16 as the original does (fp16 values, float32 tensor)."""
    return (1.0 / 10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)).half().float()


def rotary_table(
    length: int, rot_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, rot_dim] as the original computes them in `dtype`: positions, θ and their product are
    rounded to the model dtype (bf16 even rounds positions above 256), then cos/sin rounded to it."""
    t = torch.arange(length, device=device, dtype=torch.float32).to(dtype)
    freqs = t[:, None] * rotary_inv_freq(rot_dim).to(device=device, dtype=dtype)[None, :]  # [L, r/2]
    angles = torch.cat([freqs, freqs], dim=-1)  # [L, r]: rotate-half layout
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotate-half: pairs (j, j + r/2) inside a width-r part."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@dataclass(frozen=True)
class Rotary:
    """The cos/sin of one forward pass, [B, T, 1, r] each: `p` for the first half of every head, `b` the second."""

    cos_p: torch.Tensor
    sin_p: torch.Tensor
    cos_b: torch.Tensor
    sin_b: torch.Tensor

    def to(self, device: torch.device) -> Rotary:
        """The same tables on another device (a model spread over several GPUs)."""
        return Rotary(*(t.to(device) for t in (self.cos_p, self.sin_p, self.cos_b, self.sin_b)))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate q or k [B, T, n, d]."""
        r = x.shape[-1] // 2
        return torch.cat([_rotate(x[..., :r], self.cos_p, self.sin_p), _rotate(x[..., r:], self.cos_b, self.sin_b)], -1)


# ---- layers (spec 3.2-3.6) -------------------------------------------------------------------------


class GLMAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.layer_idx = layer_idx
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, rotary: Rotary, bias: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        b, t, _ = x.shape
        # rows 3d·i .. 3d·i+3d−1 of the projection are head i's (q, k, v)
        q, k, v = self.query_key_value(x).view(b, t, self.heads, 3 * self.head_dim).split(self.head_dim, dim=-1)
        q, k = rotary.apply(q), rotary.apply(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, n, T, d]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # keys are cached after rotary
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # softmax(q·kᵀ/√d + bias)·v
        return self.dense(out.transpose(1, 2).reshape(b, t, -1))  # type: ignore[no-any-return]


class GLMMLP(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))  # type: ignore[no-any-return]


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = GLMAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLMMLP(config)

    def forward(self, x: torch.Tensor, rotary: Rotary, bias: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        u = self.input_layernorm(x)
        y = ALPHA * u + self.attention(u, rotary, bias, cache)  # the residual is the normed input, scaled
        v = self.post_attention_layernorm(y)
        return ALPHA * v + self.mlp(v)  # type: ignore[no-any-return]


# ---- models --------------------------------------------------------------------------------------


class ChatGLMPreTrainedModel(PreTrainedModel):
    config: ChatGLMConfig
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLMBlock"]  # noqa: RUF012 - transformers reads this class attribute

    def _init_weights(self, module: nn.Module) -> None:
        # weights always come from a checkpoint; random ones only in tests, which set their own
        pass


class ChatGLMModel(ChatGLMPreTrainedModel):
    """Embedding, the blocks and the final LayerNorm (`transformer.*` in the checkpoint)."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self._rotary: dict[tuple[torch.dtype, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def rotary_for(self, position: torch.Tensor, block: torch.Tensor, dtype: torch.dtype) -> Rotary:
        """cos/sin at these positions from a table in the model dtype, grown when a larger position comes."""
        rot_dim = self.config.hidden_size // self.config.num_attention_heads // 2
        key = (dtype, str(position.device))
        cos, sin = self._rotary.get(key, (None, None))
        needed = int(torch.maximum(position.max(), block.max())) + 1
        if cos is None or sin is None or cos.shape[0] < needed:
            length = max(self.config.max_sequence_length, 1 << (needed - 1).bit_length())
            cos, sin = rotary_table(length, rot_dim, dtype, position.device)
            self._rotary[key] = (cos, sin)
        p, b = position[:, :, None], block[:, :, None]  # [B, T, 1]: one table row per token, for every head
        return Rotary(cos[p], sin[p], cos[b], sin[b])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """input_ids [B, T]; attention_mask [B, past + T] (1 real, 0 left padding); position_ids [B, T] counted over
        real tokens, or [B, 2, T] given explicitly (position, block position)."""
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        batch, length = input_ids.shape
        if attention_mask is not None:
            real = attention_mask.bool()
        else:
            real = torch.ones((batch, past + length), dtype=torch.bool, device=input_ids.device)
        if past == 0:
            context, mask_pos = prompt_layout(input_ids, real[:, -length:], self.config)
            if cache is not None:
                setattr(cache, ROW_STATE, {"context": context, "mask_pos": mask_pos})
        else:
            rows = getattr(cache, ROW_STATE, None)
            if rows is None:
                raise ValueError("a ChatGLM cache must come from this model's own prefill")
            context, mask_pos = rows["context"], rows["mask_pos"]
        if position_ids is not None and position_ids.dim() == 3:
            position, block = position_ids[:, 0], position_ids[:, 1]
        else:
            if position_ids is None:
                position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            position, block = positions_2d(position_ids, context, mask_pos)

        x = self.word_embeddings(input_ids)  # [B, T, h]
        rotary = self.rotary_for(position, block, x.dtype)
        bias = attention_bias(real, context, past, length, x.dtype)
        hidden: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(x)
            x = layer(x, rotary, bias, cache)
        x = self.final_layernorm(x)
        if output_hidden_states:
            hidden.append(x)
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            cache=cache if use_cache else None,
            hidden_states=tuple(hidden) if output_hidden_states else None,
        )


def fix_invalid_scores(logits: torch.Tensor) -> torch.Tensor:
    """The original's InvalidScoreLogitsProcessor, per row: a row with NaN or ±inf becomes 0s with 5·10⁴ at `▁`."""
    bad = ~torch.isfinite(logits).all(-1, keepdim=True)  # [..., 1]
    if not bool(bad.any()):
        return logits
    forced = torch.zeros_like(logits)
    forced[..., FALLBACK_TOKEN] = 5e4
    return torch.where(bad, forced, logits)


class ChatGLMForCausalLM(ChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM-6B with its LM head, tied to the word embeddings as in the original."""

    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}  # noqa: RUF012

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.word_embeddings.weight
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        head: nn.Linear = self.lm_head
        return head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        out = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        x = out.last_hidden_state
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = fix_invalid_scores(self.lm_head(x))  # [B, T, V]
        return CausalLMOutputWithPast(logits=logits, cache=out.cache, hidden_states=out.hidden_states)
