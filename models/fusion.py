"""Projections that read the same input computed as one matmul: q/k/v, gate/up. The fused weight is made once and
the layers' own weights become views of it, so the model holds no second copy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from models.packing import int4_cpu_layout
from models.quantize import QuantizedLinear


def fuse_outputs(layers: Sequence[nn.Module], cast_back: bool = True) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """One function for layers that read the same input, their outputs side by side [..., Σ out]: one kernel call
    and one pair of casts instead of one each (q/k/v and gate/up of a decode step: `bench/lean_decode.py`). The fused
    weights are the layers' own: each layer's weights become a view of the fused copy, so nothing is held twice; an
    int4 layer's scales become a view too, which its own kernel calls copy whole (only prefill calls them then). None
    where the layers differ in kernel, dtype, width or group, or an int4 layer's rows do not fill whole tiles.
    `cast_back`: as `QuantizedLinear.few_rows` has it."""
    if all(type(m) is nn.Linear for m in layers):
        return _fuse_dense([m for m in layers if isinstance(m, nn.Linear)])
    quantized = [m for m in layers if isinstance(m, QuantizedLinear)]
    if len(quantized) != len(layers):
        return None
    first = quantized[0]
    same = {(m.kernel, m.in_features, m.group, m.act, m.bias is None) for m in quantized}
    layout = int4_cpu_layout() if first.kernel == "int4pack_cpu" else None
    if len(same) != 1 or first.kernel not in ("int8pack", "int4pack_cpu") or first.act is None:
        return None
    if first.kernel == "int4pack_cpu" and (layout is None or any(m.out_features % layout[0] for m in quantized)):
        return None
    names = ("weight", "scale") if first.kernel == "int8pack" else ("packed", "scales_zeros")
    dims = (0, 0) if first.kernel == "int8pack" else (0, 1)  # int4 scales are [in/group, out, 2]
    fused = QuantizedLinear(first.in_features, sum(m.out_features for m in quantized), first.bits)
    fused.kernel, fused.group = first.kernel, first.group
    for name, dim in zip(names, dims, strict=True):
        whole = torch.cat([m._buffers[name] for m in quantized], dim=dim)  # type: ignore[misc]
        fused.register_buffer(name, whole)
        start = 0
        for m in quantized:
            m._buffers[name] = whole.narrow(dim, start, m.out_features)
            m._few = None
            start += m.out_features
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.data for m in quantized if m.bias is not None]), False)
    return fused.few_rows(cast_back)


def _fuse_dense(layers: list[nn.Linear]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    first = layers[0]
    if len({(m.in_features, m.weight.dtype, m.weight.device, m.bias is None) for m in layers}) != 1:
        return None
    weight = torch.cat([m.weight.data for m in layers])
    bias = None if first.bias is None else torch.cat([m.bias.data for m in layers if m.bias is not None])
    start = 0
    for m in layers:
        m.weight = nn.Parameter(weight[start : start + m.out_features], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start : start + m.out_features], requires_grad=False)
        start += m.out_features
    return partial(F.linear, weight=weight, bias=bias)
