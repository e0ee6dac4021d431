"""An LM head's product as int8 × int8 (FBGEMM's GEMM), where that measures faster than the weight-only kernel.

Why: on a CPU without native bf16 (AVX2) the weight-only int8 kernel, fed bf16, takes the bundled model's LM head
(576 → 49152) 2.6 ms at one row and 15 ms at 16 rows, the largest single cost of a decode batch; FBGEMM multiplies
int8 inputs by the same int8 rows in about a fifth of that (bench/README.md, "The LM head's inputs in int8"). Which
is faster on a machine is measured at load (models/calibrate.py); this module only computes.

Int8 inputs lose precision where the hidden state has a few large columns, as a final norm's output does, so:

- each row is scaled to [-1, 1] by its own largest value and quantized with one fixed scale, so a row's logits never
  depend on the rows beside it (FBGEMM's dynamic linear takes one scale for the whole batch);
- inputs span 0..128 (zero point 64), not 0..255: FBGEMM's AVX2 kernels add pairs of u8 × s8 products in int16,
  which full-range inputs can overflow;
- the caller recomputes each row's top 64 logits in float32 from the int8 rows (models/quantize.py `_exact`), so the
  top of the distribution, and a greedy answer, are those of the weight-only kernel. The rest moves by a mean KL
  divergence of about 0.002 nats on the bundled model's hidden states, the size of bf16's own rounding there.
  Multiplying what the rounding lost as a second row cut that to 0.0005 but doubled the time at 16 rows, where the
  product is compute-bound; not kept.

PyTorch marks its quantized tensors deprecated (pytorch/pytorch#184982); torch 2.13 has them. `pack` returns None
where the ops are missing (another backend, a later torch) and the head keeps its weight-only kernel.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

LEVELS = 127  # input steps across [-1, 1]: codes 0..128 around the zero point
ZERO = 64
STEP = 2.0 / LEVELS


def _product(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """x [M, in] float32 in [-1, 1] → x·Wᵀ [M, out] float32, x quantized to STEP around ZERO."""
    out: torch.Tensor = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, STEP, ZERO, packed)
    return out


# looked up at each call, so a test can slow it down and see the calibration keep the weight-only kernel
KERNELS: dict[str, Callable[[torch.Tensor, Any], torch.Tensor]] = {"int8x8": _product}


class Int8Inputs:
    """`x·Wᵀ` for int8 rows W [out, in] with a float scale each, the inputs quantized to int8 as above."""

    def __init__(self, packed: Any, nbytes: int) -> None:
        self.packed = packed
        self.nbytes = nbytes  # FBGEMM's own copy of the rows, beside the layer's

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] → [M, out] float32."""
        x = x.float()
        size = x.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)  # [M, 1]
        return KERNELS["int8x8"](x / size, self.packed) * size


def pack(weight: torch.Tensor, scale: torch.Tensor) -> Int8Inputs | None:
    """FBGEMM's packed form of int8 rows `weight` [out, in] with scales `scale` [out]; None where this PyTorch
    cannot do it or its products disagree with the plain ones."""
    out, inputs = weight.shape
    try:
        with warnings.catch_warnings():  # the deprecation above: known, and checked here at every load
            warnings.simplefilter("ignore")
            rows = torch._make_per_channel_quantized_tensor(
                weight.contiguous(), scale.double(), torch.zeros(out, dtype=torch.long), 0
            )
            packed = torch.ops.quantized.linear_prepack(rows, None)
        product = Int8Inputs(packed, weight.numel() + 4 * out)
        x = torch.randn(3, inputs, generator=torch.Generator().manual_seed(0))
        some = min(out, 1024)  # enough rows to see a broken product, without a float copy of a big head
        want = x @ (weight[:some].float() * scale[:some].float()[:, None]).t()
        got = product(x)[:, :some]
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        log.info("int8 × int8 products unavailable: %s", exc)
        return None
    # a sound product errs by about 1% of the largest value here; one that overflows (full-range inputs on AVX2) by 40%
    if not torch.allclose(got, want, rtol=0, atol=5e-2 * float(want.abs().max())):
        log.warning("int8 × int8 products disagree with the plain ones here (%.3g); not used", (got - want).abs().max())
        return None
    return product
