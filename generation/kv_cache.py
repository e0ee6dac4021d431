"""The float32 KV cache layer of models on a CPU (see generation/attention.py), which grows in place.

A layer holds buffers [rows, H, tokens, D] with room past what is used in both directions: a decode step writes
its token into the room instead of copying the whole cache, as concatenation does (at a decode batch of long
prompts that copy is hundreds of MB per step), and a request that joins the batch is written into a spare row, one
that leaves is filled by moving the rows after it up. Under load joins and leaves are many: each used to copy the
whole batch's cache twice (a concatenation, then growing the exact-sized result at the next step); the Poisson mix of
`bench/serve_bench.py` measures what this saves (bench/README.md).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class Fp32Layer(DynamicLayer):  # type: ignore[no-untyped-call]
    """A growing cache layer [B, H, T, D] that stores keys and values in float32 whatever the model computes in.

    `keys`/`values` are views of the used part; assigning them replaces the buffers. `join` and `keep` change the
    rows in place where the room allows."""

    def __init__(self, reserve: int = 0) -> None:
        self._reserve = reserve  # tokens the first buffer holds room for (a prompt prefilled in chunks: all of it)
        self._k: torch.Tensor | None = None  # [row capacity, H, token capacity, D], or empty before the first update
        self._v: torch.Tensor | None = None
        self._rows = 0  # rows used
        self._nk = self._nv = 0  # tokens used (set apart: assigning keys and values are two steps)
        super().__init__()  # type: ignore[no-untyped-call]

    @property
    def keys(self) -> torch.Tensor | None:
        return _used(self._k, self._rows, self._nk)

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._k, self._nk, self._rows = t, _length(t), _count(t)

    @property
    def values(self) -> torch.Tensor | None:
        return _used(self._v, self._rows, self._nv)

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._v, self._nv, self._rows = t, _length(t), _count(t)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states.float(), value_states.float())

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append [B, H, L, D] new keys and values; returns all of them [B, H, T + L, D] in float32."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, added, rows = self._nk, key_states.shape[-2], key_states.shape[0]
        assert self._nv == n, "keys and values of different lengths"
        if not _holds(self._k, rows, n + added):
            self._k, self._v = self._moved(rows, n + added, 0, key_states)
        assert self._k is not None and self._v is not None
        self._k[:rows, :, n : n + added] = key_states
        self._v[:rows, :, n : n + added] = value_states
        self._rows, self._nk, self._nv = rows, n + added, n + added
        keys, values = self.keys, self.values
        assert keys is not None and values is not None
        return keys, values

    def join(self, keys: torch.Tensor, values: torch.Tensor, grow: int, pad: int, max_rows: int) -> None:
        """Append rows [b, H, T, D] after those held, every row ending at the last column: `grow` columns of zeros go
        in front of the rows held, `pad` in front of the new ones. Into the spare rows where there are enough and
        no column is added (the rows held stay where they are), else into new buffers with room for up to
        `max_rows` rows."""
        rows, width, need = self._rows, self._nk + grow, self._rows + keys.shape[0]
        if grow or not _holds(self._k, need, width):
            self._k, self._v = self._moved(max(need, min(max_rows, 2 * need)), width, grow, keys)
        assert self._k is not None and self._v is not None
        for buffer, new in ((self._k, keys), (self._v, values)):
            buffer[rows : rows + new.shape[0], :, :pad] = 0  # padding is masked, but 0 · NaN would not be
            buffer[rows : rows + new.shape[0], :, pad:width] = new
        self._rows, self._nk, self._nv = rows + keys.shape[0], width, width

    def keep(self, rows: list[int], start: int) -> None:
        """Keep `rows` (increasing) and the columns from `start`: rows after a gap move up in place, and only
        dropping columns copies the rest into new buffers."""
        assert self._k is not None and self._v is not None
        width = self._nk - start
        if start:
            index = torch.tensor(rows, device=self._k.device)
            k, v = self._k, self._v
            self._k, self._v = self._fresh(k.shape[0], width, k), self._fresh(v.shape[0], width, v)
            torch.index_select(k[:, :, start : self._nk], 0, index, out=self._k[: len(rows), :, :width])
            torch.index_select(v[:, :, start : self._nk], 0, index, out=self._v[: len(rows), :, :width])
        else:
            for j, i in enumerate(rows):
                if i != j:  # j < i: the row moves up into a row already given up
                    self._k[j, :, :width] = self._k[i, :, :width]
                    self._v[j, :, :width] = self._v[i, :, :width]
        self._rows, self._nk, self._nv = len(rows), width, width

    def _moved(self, rows: int, tokens: int, shift: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New buffers with room for `rows` rows, `tokens` tokens and more, holding what is used `shift` columns
        further right (zeros in front); heads and head size as `like` [B, H, T, D] has them."""
        out = []
        for old in (self._k, self._v):
            buffer = self._fresh(max(rows, self._rows), tokens, like)
            if old is not None and old.dim() == 4 and self._nk:
                buffer[: self._rows, :, :shift] = 0
                buffer[: self._rows, :, shift : shift + self._nk] = old[: self._rows, :, : self._nk]
            out.append(buffer)
        return out[0], out[1]

    def _fresh(self, rows: int, tokens: int, like: torch.Tensor) -> torch.Tensor:
        """An empty float32 buffer [rows, H, tokens and room for more, D], with H and D from `like` [B, H, T, D]."""
        room = max(tokens, self._reserve)
        room += max(64, room // 8)
        return like.new_empty((rows, like.shape[1], room, like.shape[3]), dtype=torch.float32)


def _used(t: torch.Tensor | None, rows: int, n: int) -> torch.Tensor | None:
    return t[:rows, :, :n] if t is not None and t.dim() == 4 else t


def _length(t: torch.Tensor | None) -> int:
    return t.shape[-2] if t is not None and t.dim() == 4 else 0


def _count(t: torch.Tensor | None) -> int:
    return t.shape[0] if t is not None and t.dim() == 4 else 0


def _holds(t: torch.Tensor | None, rows: int, tokens: int) -> bool:
    return t is not None and t.dim() == 4 and t.shape[0] >= rows and t.shape[2] >= tokens


PLAIN_LAYERS = (DynamicLayer, Fp32Layer)  # growing layers whose rows can be padded, merged and selected


def new_cache(model: Any, fp32: bool, reserve: int = 0) -> DynamicCache | None:
    """An empty cache for a first forward pass: float32 layers where the model attends in float32, with room for
    `reserve` tokens from the start, else None (the model makes its own)."""
    if not fp32:
        return None
    cache = DynamicCache(config=model.config)
    cache.layers = [Fp32Layer(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
