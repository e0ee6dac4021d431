"""Timing a layer's kernels the way a step meets them: on random weights of the real shape, cycling through enough
copies that their weights come from memory, not the cache, and taking the median of rounds."""

from __future__ import annotations

import copy
import math
import statistics
import time

import torch
from torch import nn

from models.quantize import INT4_GROUP, QuantizedLinear, quantize_linear

SAMPLE_BYTES = 64 << 20  # weights one timing cycles through: past the last-level cache of most CPUs
TIMING_S = 0.02  # wall time a timing runs for


def dense_copy(layer: QuantizedLinear, dtype: torch.dtype) -> nn.Module:
    """A dense layer holding `layer`'s weights dequantized to `dtype`: what a held copy multiplies with."""
    dense = nn.Linear(layer.in_features, layer.out_features, bias=False)
    dense.weight.data = layer._dense_now(dtype)
    return dense


def sample_layers(inputs: int, outputs: int, count: int, bits: int, dtype: torch.dtype) -> list[nn.Module]:
    """Enough copies of this unit, as one layer of its whole width with random weights, that cycling through them
    reads memory: one made by the serving code (quantize_linear, with its checks), the rest copies of it (a
    kernel's speed does not depend on the values, and copying is far quicker than quantizing)."""
    per_layer = inputs * outputs * (dtype.itemsize if bits == 16 else bits / 8)
    count = max(1, min(count, math.ceil(SAMPLE_BYTES / per_layer)))
    generator = torch.Generator().manual_seed(inputs * 7 + outputs)
    linear = nn.Linear(inputs, outputs, bias=False)
    linear.weight.data = torch.randn(outputs, inputs, generator=generator) * 0.02
    first = linear.to(dtype) if bits == 16 else quantize_linear(linear, bits, INT4_GROUP, dtype, "cpu")
    return [first, *(copy.deepcopy(first) for _ in range(count - 1))]


def time_layers(layers: list[nn.Module], x: torch.Tensor, reuse: bool = False) -> float:
    """µs per call of `layer(x)`, cycling through the layers: after a first pass over all of them each call finds
    its weights as long ago as the whole sample (out of the cache, as in a step). Timed in rounds of a pass each for
    about TIMING_S; the median round, so that a burst of other work on the machine does not decide. A prefill's many
    rows reuse each weight they read (`reuse`), so there two layers do."""
    layers = layers[:2] if reuse else layers
    for layer in layers:  # the first call of a kernel may set itself up
        layer(x)
    rounds: list[float] = []
    start = time.perf_counter()
    while len(rounds) < 3 or time.perf_counter() - start < TIMING_S:
        began = time.perf_counter()
        for layer in layers:
            layer(x)
        rounds.append((time.perf_counter() - began) / len(layers))
    return round(statistics.median(rounds) * 1e6, 1)
