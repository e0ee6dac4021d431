"""Batched forward passes: prefill and decode over the KV cache of a decode batch, whose rows join after
their own prefill and leave when done.

Rows are left-padded to a common length; an attention mask hides the padding and explicit
position ids keep every row's positions its own, so a row decodes the same tokens in a batch
as alone.

A model whose positions need more than a count (ChatGLM-6B's 2D positions) keeps per-row numbers
on its cache as `row_state`, a dict of tensors [B, ...]; they join, leave and are selected with
the cache's rows.
"""

from __future__ import annotations

from typing import Any

import torch

from generation import lean
from generation.kv_cache import PLAIN_LAYERS, Fp32Layer, new_cache
from models.devices import free_memory
from models.loader import LoadedModel
from models.quantize import dense_bytes, dense_held
from models.row_state import ROW_STATE


def batchable(cache: Any) -> bool:
    """Only plain growing layers can be padded and merged (sliding-window layers cannot)."""
    layers: list[Any] = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) in PLAIN_LAYERS for layer in layers)


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """[B, H, T, D] → [B, H, n + T, D] with zeros in front."""
    if n == 0:
        return t
    return torch.cat([t.new_zeros((*t.shape[:2], n, t.shape[3])), t], dim=2)


def _row_state(cache: Any) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = getattr(cache, ROW_STATE, None) or {}
    return state


def _select_row_state(cache: Any, index: torch.Tensor) -> None:
    """Keep the per-row numbers of the rows `index` selects, in its order."""
    if state := _row_state(cache):
        setattr(cache, ROW_STATE, {k: v.index_select(0, index) for k, v in state.items()})


def select_rows(cache: Any, rows: list[int]) -> Any:
    """Keep only `rows` of a freshly prefilled cache (in place; returns it)."""
    if len(rows) == cache.layers[0].keys.shape[0]:
        return cache
    index = torch.tensor(rows, device=cache.layers[0].keys.device)
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)
    _select_row_state(cache, index)
    return cache


class KVBatch:
    """A DynamicCache [B, H, T, D] per layer, its mask [B, T], and each row's next position."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, T] long: 1 real, 0 padding
        self.positions: list[int] = []  # per row: position of the next token fed

    def __len__(self) -> int:
        return len(self.positions)

    def add(self, cache: Any, mask: torch.Tensor, max_rows: int = 1) -> None:
        """Append prefilled sequences: their cache [b, H, S, D] per layer and mask [b, S] become the last rows.
        Float32 layers take them into spare rows where they can, and make room for up to `max_rows`."""
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
        else:
            width, length = self.mask.shape[1], mask.shape[1]
            grow, pad = max(0, length - width), max(0, width - length)
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                if isinstance(mine, Fp32Layer):
                    mine.join(theirs.keys, theirs.values, grow, pad, max_rows)
                    continue
                mine.keys = torch.cat([_pad_left(mine.keys, grow), _pad_left(theirs.keys, pad)], dim=0)
                mine.values = torch.cat([_pad_left(mine.values, grow), _pad_left(theirs.values, pad)], dim=0)
            if state := _row_state(self.cache):
                theirs_state = _row_state(cache)
                setattr(self.cache, ROW_STATE, {k: torch.cat([v, theirs_state[k]]) for k, v in state.items()})
            self.mask = torch.cat(
                [
                    torch.cat([self.mask.new_zeros((len(self), grow)), self.mask], dim=1),
                    torch.cat([mask.new_zeros((mask.shape[0], pad)), mask], dim=1),
                ]
            )
        self.positions.extend(int(n) for n in mask.sum(dim=1))

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (in order), then the padding columns no row needs any more (float32 layers:
        only when they are a quarter of the width or more, as dropping them copies the cache)."""
        if len(rows) == len(self):
            return
        if not rows:
            self.cache, self.mask, self.positions = None, None, []
            return
        assert self.mask is not None
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(dim=0).long().argmax())  # first column some row still uses
        in_place = all(isinstance(layer, Fp32Layer) for layer in self.cache.layers)
        if in_place and 4 * start < mask.shape[1]:
            start = 0
        for layer in self.cache.layers:
            if in_place:
                layer.keep(rows, start)
                continue
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        _select_row_state(self.cache, index)
        self.mask = mask[:, start:]
        self.positions = [self.positions[i] for i in rows]

    def step_inputs(self, tokens: list[int]) -> dict[str, Any]:
        """Model inputs that feed each row its next token: ids [B, 1], positions [B, 1], mask [B, T + 1]."""
        assert self.mask is not None
        device = self.mask.device
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=1)
        inputs = {
            "input_ids": torch.tensor(tokens, device=device).unsqueeze(1),
            "position_ids": torch.tensor(self.positions, device=device).unsqueeze(1),
            "attention_mask": self.mask,
            "cache": self.cache,
            "use_cache": True,
        }
        self.positions = [p + 1 for p in self.positions]
        return inputs


def prefill(lm: LoadedModel, prompts: list[list[int]]) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Run prompts together, left-padded; return last-position logits [B, V], the KV cache and its mask [B, S]."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[p[0]] * (width - len(p)) + p for p in prompts], device=lm.device)  # [B, S]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=lm.device)  # [B, S]
    extra: dict[str, Any] = {"logits_to_keep": 1} if lm.accepts_logits_to_keep else {}
    if len(prompts) > 1:  # a lone prompt needs no mask: the plain causal path is the fastest
        extra.update(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with dense_held(lm.prefill_copy):
        out = lm.model(input_ids=ids, cache=new_cache(lm.model, lm.fp32_attention), use_cache=True, **extra)
    logits: torch.Tensor = out.logits[:, -1].float()  # [B, V]
    return logits, out.cache, mask


HELD = "held_weights"  # the attribute of a chunked prompt's cache that keeps its dequantized weights until its end


def prefill_chunk(lm: LoadedModel, ids: list[int], cache: Any, more: int = 0) -> tuple[torch.Tensor, Any]:
    """Feed the next piece of one prompt after the `cache` of the pieces before it (None for the first);
    returns the last position's logits [1, V] and the grown cache. `more`: the prompt's tokens after this piece,
    so that the first piece's cache has room for the whole prompt, and the pieces of a quantized model share one
    dequantized copy of its weights while it lasts, if a quarter of the free memory holds it (the model's own
    prefill copy, where it keeps one)."""
    extra: dict[str, Any] = {"logits_to_keep": 1} if lm.accepts_logits_to_keep else {}
    held: dict[Any, torch.Tensor] | None = getattr(cache, HELD, None) or lm.prefill_copy
    if cache is None:
        cache = new_cache(lm.model, lm.fp32_attention, reserve=len(ids) + more)
    if not hasattr(cache, HELD):  # the prompt's first piece (after nothing, or after a prefix cache hit)
        need = dense_bytes(lm.model) if more and lm.prefill_copy is None else 0
        held = {} if need and need <= free_memory(list(lm.devices) or [lm.device]) // 4 else lm.prefill_copy
    with dense_held(held):
        out = lm.model(input_ids=torch.tensor([ids], device=lm.device), cache=cache, use_cache=True, **extra)
    setattr(out.cache, HELD, held if more and held is not lm.prefill_copy else None)
    logits: torch.Tensor = out.logits[:, -1].float()  # [1, V]
    return logits, out.cache


def prefill_groups(prompts: list[list[int]], waste: float = 1.25) -> list[list[int]]:
    """Indices of prompts to prefill together: similar lengths, so padding costs at most `waste`."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups: list[list[int]] = []
    for i in order:
        group = groups[-1] if groups else None
        if group is not None and len(prompts[i]) * (len(group) + 1) <= waste * (
            sum(len(prompts[j]) for j in group) + len(prompts[i])
        ):
            group.append(i)
        else:
            groups.append([i])
    return groups


def decode_step(lm: LoadedModel, batch: KVBatch, tokens: list[int]) -> torch.Tensor:
    """Feed each row of the batch its last token; return next-token logits [B, V]."""
    inputs = batch.step_inputs(tokens)
    if lm.lean_decode:  # the same step as plain functions (generation/lean.py); the cache grows in place
        mask = inputs["attention_mask"]
        return lean.step(
            lm.model,
            inputs["input_ids"],
            inputs["position_ids"],
            None if bool(mask.all()) else mask,
            batch.cache,
            lm.fp32_attention,
        )
    out = lm.model(**inputs)
    batch.cache = out.cache
    logits: torch.Tensor = out.logits[:, -1].float()  # [B, V]
    return logits
