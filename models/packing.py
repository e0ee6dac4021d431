"""Weights as small integers: int8 rows and int4 groups, the original ChatGLM's int4 packing, and reading back
PyTorch's CPU int4 tile layout (which differs with the instruction set)."""

from __future__ import annotations

import functools

import torch


def quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in] within ±(2^(bits−1) − 1), scale fp16 [out]), exactly as the original ChatGLM computes
    them: from the fp16 weight, scale = max|row| / 127 (or 7) and q = round-half-even(W / scale), both in fp16."""
    w = weight.to(torch.float16)
    scale = w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row stays zero, not NaN
    return torch.round(w / safe[:, None]).to(torch.int8), scale


def quantize_groups(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 with a scale and a minimum per `group` input columns: w ≈ u·scale + low, u in 0..15.
    Returns (u uint8 [out, in], scale [out, in/group], low [out, in/group]) in float32."""
    out, width = weight.shape
    w = weight.float().reshape(out, width // group, group)
    low, high = w.amin(-1), w.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    u = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return u.reshape(out, width), scale, low


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values [out, in] → int8 [out, in/2]: byte j = (q[2j] << 4) | (q[2j+1] & 0xF), the even column high
    (the original ChatGLM's layout, also what our plain path stores)."""
    return ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.int8)


@functools.cache
def int4_cpu_layout() -> tuple[int, bool] | None:
    """How `_convert_weight_to_int4pack_for_cpu` lays out nibbles on this CPU, which differs with the instruction set
    PyTorch dispatches to: (output rows per block, whether a byte holds two neighbouring rows) where each input
    column of a block takes block/2 bytes; None if no known layout fits (then no dense copy is made). Found by packing
    a random matrix and reading it back each known way (AVX-512: 64 rows, low nibbles rows 0-31, high 32-63; AVX2:
    32 rows, 0-15 and 16-31; no vector unit: 32 rows, neighbours in one byte)."""
    u = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    except (RuntimeError, NotImplementedError):
        return None
    for layout in ((64, False), (32, False), (32, True), (64, True), (16, False), (16, True)):
        try:
            if torch.equal(read_int4_cpu(packed, 128, 64, layout), u.to(torch.uint8)):
                return layout
        except RuntimeError:  # the packed size does not fit this layout
            continue
    return None


def read_int4_cpu(packed: torch.Tensor, n: int, k: int, layout: tuple[int, bool]) -> torch.Tensor:
    """The values 0..15 [n, k] uint8 of an int4 CPU tile packing with the given `int4_cpu_layout`."""
    block, neighbours = layout
    x = packed.view(torch.uint8).reshape(n // block, k, block // 2)
    low, high = x & 0xF, x >> 4
    u = torch.stack([low, high], dim=-1).flatten(-2) if neighbours else torch.cat([low, high], dim=-1)
    return u.transpose(1, 2).reshape(n, k)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`, sign-extending each nibble."""
    high = packed >> 4
    low = (packed << 4) >> 4
    return torch.stack([high, low], dim=-1).reshape(packed.shape[0], -1)


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (q int8 [out, in], scale float32 [out]) with w ≈ q·scale."""
    w = weight.detach().float()
    scale = (w.abs().amax(-1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).to(torch.int8), scale
