"""Weight-only int8/int4 quantization the original ChatGLM-6B way (spec section 8), computed with PyTorch's own
weight-only kernels.

The integers and scales are the original's, bit for bit: symmetric, one fp16 scale per output row, the division
done in fp16. Compute does not dequantize first (on a CPU that is slower than bf16): `_weight_int8pack_mm` and the
int4 tile kernels multiply the packed weights directly. Each layer checks its kernel once against a plain
dequantize-then-matmul and keeps that plain path where the kernel is missing or disagrees (a device or shape it
does not support).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# the int4 tile kernels take one scale per group of input columns; a whole row's scale is repeated per group
_GROUP_SIZES = (256, 128, 64, 32)


def quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in] within ±(2^(bits−1) − 1), scale fp16 [out]) of a weight, exactly as the original computes
    them: from the fp16 weight, scale = max|row| / 127 (or 7) and q = round-half-even(W / scale), both in fp16."""
    w = weight.to(torch.float16)
    scale = w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row stays zero, not NaN
    return torch.round(w / safe[:, None]).to(torch.int8), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values [out, in] → int8 [out, in/2]: byte j = (q[2j] << 4) | (q[2j+1] & 0xF), the even column high."""
    return ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`, sign-extending each nibble."""
    high = packed >> 4
    low = (packed << 4) >> 4
    return torch.stack([high, low], dim=-1).reshape(packed.shape[0], -1)


class QuantizedLinear(nn.Module):
    """`y = x·(q·scale)ᵀ + b` with int8 or int4 `q`; holds only the kernel's format of the weights."""

    def __init__(self, in_features: int, out_features: int, bits: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.kernel = "dequantize"
        self.group = 0
        self.bias: nn.Parameter | None = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, kernel={self.kernel}"

    def set_weights(
        self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: str
    ) -> None:
        """Take the quantized rows (q int8 [out, in] unpacked, scale [out]) and pick the fastest kernel that agrees
        with dequantize-then-matmul on this device, in the model's dtype."""
        q, scale = q.to(device), scale.to(device=device, dtype=dtype)
        self.bias = None if bias is None else nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
        for kernel in self._candidates(device):
            try:
                self._store(kernel, q, scale)
                if self._agrees(q, scale, dtype, device):
                    return
            except (RuntimeError, NotImplementedError) as exc:  # not built for this device, dtype or shape
                log.debug("%s kernel unavailable for %s: %s", kernel, self.extra_repr(), exc)
        self._store("dequantize", q, scale)

    def _candidates(self, device: str) -> list[str]:
        if self.bits == 8:
            return ["int8pack"]
        # which nibble of a byte the CUDA tile packer reads first is not documented: the check below decides
        return ["int4pack_cuda", "int4pack_cuda_swapped"] if device.startswith("cuda") else ["int4pack_cpu"]

    def _store(self, kernel: str, q: torch.Tensor, scale: torch.Tensor) -> None:
        for name in ("weight", "scale", "packed", "scales_zeros"):
            self._buffers.pop(name, None)
        self.kernel = kernel
        if kernel == "int8pack":
            self.register_buffer("weight", q.contiguous())
            self.register_buffer("scale", scale)
        elif kernel.startswith("int4pack"):
            self.group = next(g for g in _GROUP_SIZES if self.in_features % g == 0)
            groups = self.in_features // self.group
            zeros = torch.zeros_like(scale)
            sz = torch.stack([scale.expand(groups, -1), zeros.expand(groups, -1)], dim=-1).contiguous()
            if kernel == "int4pack_cpu":  # unsigned nibbles: (u − 8)·scale + 0 = q·scale
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q + 8).to(torch.int32), 1)
            else:
                u = (q + 8).to(torch.uint8)
                first, second = (u[:, 0::2], u[:, 1::2]) if kernel == "int4pack_cuda" else (u[:, 1::2], u[:, 0::2])
                packed = torch.ops.aten._convert_weight_to_int4pack((first << 4) | second, 8)
            self.register_buffer("packed", packed)
            self.register_buffer("scales_zeros", sz)
        else:  # the original's own compute: dequantize, then an ordinary matmul
            self.register_buffer("weight", pack_int4(q) if self.bits == 4 else q.contiguous())
            self.register_buffer("scale", scale)

    def _agrees(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, device: str) -> bool:
        x = torch.randn(2, self.in_features, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
        want = x.float() @ (q.float() * scale.float()[:, None]).t()
        got = self._matmul(x).float()
        return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()) + 1e-6))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] → [M, out] without bias."""
        b = self._buffers
        out: torch.Tensor
        if self.kernel == "int8pack":
            out = torch.ops.aten._weight_int8pack_mm(x, b["weight"], b["scale"])
        elif self.kernel == "int4pack_cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, b["packed"], self.group, b["scales_zeros"])
        elif self.kernel.startswith("int4pack_cuda"):
            out = torch.ops.aten._weight_int4pack_mm(x, b["packed"], self.group, b["scales_zeros"])
        else:
            weight, scale = b["weight"], b["scale"]
            assert weight is not None and scale is not None
            q = unpack_int4(weight) if self.bits == 4 else weight
            out = F.linear(x, q.to(x.dtype) * scale[:, None])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, self.in_features).contiguous()).reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def quantize_model(model: nn.Module, names: list[str], bits: int) -> None:
    """Put empty QuantizedLinear modules (filled by the checkpoint reader) in place of the named nn.Linear."""
    for name in names:
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        setattr(model.get_submodule(parent), child, QuantizedLinear(linear.in_features, linear.out_features, bits))
