"""Weight-only int8/int4 quantization, computed with PyTorch's own weight-only kernels.

Two schemes: the original ChatGLM-6B one (symmetric, one fp16 scale per output row, bit-exact with the original:
`quantize_rows`) and, for every other model, int8 rows (symmetric) or int4 groups of input columns with a scale
and a zero each (`quantize_groups`), which keeps small models' answers far better than one int4 scale per row.

A few rows at a time (decoding) are multiplied by the packed weights directly: `_weight_int8pack_mm` and the int4
tile kernels read a quarter or an eighth of the bytes bf16 would. Each layer checks its kernel once against a plain
dequantize-then-matmul and keeps that plain path where the kernel is missing or disagrees (a device, dtype or shape
it does not support). From `DENSE_ROWS` rows on (prefill chunks) the CPU kernels are slower than a dense matmul
by more than dequantizing the layer costs (`bench/cpu_kernels.py`, figures in bench/README.md), so the layer can
be dequantized for that call and multiplied densely. Nothing dense is kept, except
while a long prompt is prefilled in chunks: its chunks share one dequantized copy (`dense_held`), where memory allows.

A CPU layer's route is measured (models/calibrate.py): the dtype its kernel is fed (`set_act`: the CPU kernels
take float32 or bf16 activations, and on a CPU without native bf16 they are still far faster fed bf16, the input
cast around the call) and the dtype of the dequantized copy for many rows, or none (`dense`). The kernels are looked up
in `KERNELS` at each call, so a test can slow one down and see the calibration choose another.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import int8_inputs
from models.packing import int4_cpu_layout, int8_rows, pack_int4, quantize_groups, read_int4_cpu, unpack_int4

log = logging.getLogger(__name__)

# the int4 tile kernels take one (scale, zero) per group of input columns
GROUP_SIZES = (256, 128, 64, 32)
INT4_GROUP = 32  # columns per int4 (scale, zero): GGUF's own block size, so a Q4 file is re-packed almost as it is
DENSE_ROWS = 128  # rows from which a CPU layer is dequantized for the call rather than run on its kernel
# the LM head's top logits recomputed in float32 from its int8 rows where its kernel is fed bf16 (see `exact_top`)
EXACT_TOP = 16
# the same where its inputs are int8 (`set_int8_inputs`): the rest of its logits are a little rougher there
EXACT_TOP_INT8 = 64
INT8_INPUTS = "int8"  # the route that feeds an LM head int8 inputs (models/int8_inputs.py), beside the dtypes

# tokens from which a layer whose dequantized copy is held multiplies by it: AVX-512, 1536x576 (ms: 16 rows int4
# kernel 0.24, int8 0.23, held bf16 0.14); AVX2, int4 fed bf16 against a float32 copy, each layer shape of the bundled
# model cycled (bench/README.md): 16 rows 0.20-0.57 against 0.22-0.85 ms, 46 rows 0.52-1.63 against 0.41-1.51 ms
HELD_ROWS = 32

# the weight-only kernels, by the name a layer records in `kernel`; looked up at each call
KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "int8pack": torch.ops.aten._weight_int8pack_mm.default,
    "int4pack_cpu": torch.ops.aten._weight_int4pack_mm_for_cpu.default,
    "int4pack_cuda": torch.ops.aten._weight_int4pack_mm.default,
}

# where the layers keep the dequantized weights they compute, while `dense_held` says so (None: nowhere)
_HELD: ContextVar[dict[nn.Module, torch.Tensor] | None] = ContextVar("held_dense_weights", default=None)


@contextmanager
def dense_held(store: dict[nn.Module, torch.Tensor] | None) -> Iterator[None]:
    """Within it, a layer that dequantizes its weights for many rows keeps them in `store` and takes them from
    there next time (the chunks of one prompt, which would otherwise dequantize the same weights once each:
    `bench/chunked_prefill.py`). The caller owns the memory: dropping `store` frees it."""
    token = _HELD.set(store)
    try:
        yield
    finally:
        _HELD.reset(token)


def hold_dense(model: nn.Module) -> dict[nn.Module, torch.Tensor]:
    """A dequantized copy of every layer that has a held dtype, for prefills to multiply with (see `dense_held`)."""
    return {m: m._dense_now(m.held) for m in model.modules() if isinstance(m, QuantizedLinear) and m.held is not None}


def dense_bytes(model: nn.Module) -> int:
    """What `dense_held` may keep at most: every layer's dequantized weights, in the dtype of its held copy."""
    return sum(
        m.in_features * m.out_features * m.held.itemsize
        for m in model.modules()
        if isinstance(m, QuantizedLinear) and m.held is not None
    )


class QuantizedLinear(nn.Module):
    """`y = x·Wᵀ + b` with W held as int8 rows or int4 groups; only the kernel's format of the weights is kept."""

    def __init__(self, in_features: int, out_features: int, bits: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.kernel = "dequantize"
        self.group = 0
        self.unpacks = False  # whether a dequantized copy can be made for many rows (CPU kernels, when it agrees)
        # the dtype of that copy, from DENSE_ROWS rows (None: the kernel); models/calibrate.py sets it
        self.dense: torch.dtype | None = None
        # the dtype of the copy the chunks of one long prompt share while `dense_held` is on (None: none is made):
        # made once, so it pays where a dense matmul beats the kernel even if dequantizing each time does not
        self.held: torch.dtype | None = None
        self.bias: nn.Parameter | None = None
        # see `few_rows`: the bound function, casting back and not (None: bind again)
        self._few: tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None = None
        self.exact_top = 0  # an LM head: its top logits recomputed in float32 (see `_exact`)
        self.int8: int8_inputs.Int8Inputs | None = None  # an LM head fed int8 inputs (see `set_int8_inputs`)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, kernel={self.kernel}, "
            f"act={INT8_INPUTS if self.int8 is not None else _name(self.act)}, dense={_name(self.dense)}"
        )

    @property
    def act(self) -> torch.dtype | None:
        """The dtype the kernel is fed (its scales are kept in it): inputs are cast to it and the output back; None
        for the plain path, which computes in the input's dtype."""
        scales = self._buffers.get("scale") if "scale" in self._buffers else self._buffers.get("scales_zeros")
        return None if self.kernel == "dequantize" or scales is None else scales.dtype

    def set_act(self, dtype: torch.dtype) -> None:
        """Feed the kernel `dtype` from now on (its scales are converted once: the kernels take them in it)."""
        self.int8 = None
        if self.kernel in ("int8pack", "int4pack_cpu"):
            for name in ("scale", "scales_zeros"):
                if (t := self._buffers.get(name)) is not None:
                    self._buffers[name] = t.to(dtype)
        self._few = None

    def keep_top_exact(self, top: int = EXACT_TOP) -> None:
        """For an LM head on the int8 kernel: whenever it is fed a 16-bit dtype, recompute each row's `top` largest
        logits in float32 from the int8 rows and return float32 logits. A bf16 logit near 25 is rounded to 0.125,
        which makes near-ties exact and hands them to the lower token id: on the bundled model, "What is the
        capital of France?" starts "The" by 0.04 in float32 and "L'" in bf16, and goes on to a wrong answer."""
        scale = self._buffers.get("scale")
        if self.kernel == "int8pack" and scale is not None:
            self.exact_top = top
            self.register_buffer("scale32", scale.float())  # [V]: the scales as computed, before any cast
            self._few = None

    def set_int8_inputs(self) -> bool:
        """For an LM head keeping its top logits exact: multiply its rows by int8 inputs from now on
        (models/int8_inputs.py), where this PyTorch can; whether it does. Packed once until the route changes."""
        if self.int8 is not None:
            return True
        weight, scale = self._buffers.get("weight"), self._buffers.get("scale32")
        if not self.exact_top or weight is None or scale is None:
            return False
        self.int8 = int8_inputs.pack(weight, scale)
        self._few = None
        return self.int8 is not None

    @property
    def extra_bytes(self) -> int:
        """Memory this layer holds outside its buffers (FBGEMM's copy of an LM head's rows)."""
        return 0 if self.int8 is None else self.int8.nbytes

    def _exact(self, x: torch.Tensor, y: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Logits y [M, V] with each row's top `k` (default `exact_top`) recomputed in float32 from x [M, in];
        float32."""
        weight, scale = self._buffers["weight"], self._buffers["scale32"]
        assert weight is not None and scale is not None
        top = y.topk(min(k or self.exact_top, y.shape[-1]), dim=-1).indices  # [M, k]
        rows = weight[top].float()  # [M, k, in]
        # a product and a sum over each row's own values: a row sums the same alone as beside others (bmm may not)
        exact = (rows * x.float()[:, None, :]).sum(-1) * scale[top]  # [M, k]
        if self.bias is not None:
            exact = exact + self.bias.float()[top]
        return y.float().scatter_(-1, top, exact)

    def set_dense(self, dtype: torch.dtype | None, held: torch.dtype | None = None) -> None:
        """Multiply DENSE_ROWS rows or more by a copy dequantized to `dtype` (None: by the kernel), and the chunks
        of a long prompt by one dequantized to `held` once (default: `dtype`)."""
        self.dense = dtype if self.unpacks else None
        self.held = (held or dtype) if self.unpacks else None

    def set_weights(
        self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: str
    ) -> None:
        """Symmetric rows: q int8 [out, in] unpacked, scale [out] (int8, or ChatGLM's int4 rows)."""
        q, scale = q.to(device), scale.to(device)
        if self.bits == 8:
            self._choose(
                [("int8pack", (q, scale.to(dtype)))], bias, dtype, device, (q.float() * scale.float()[:, None])
            )
            return
        group = next(g for g in GROUP_SIZES if self.in_features % g == 0)
        groups = self.in_features // group
        scales = scale.float()[:, None].expand(-1, groups)
        self.set_int4((q + 8).to(torch.uint8), scales, torch.zeros_like(scales), group, bias, dtype, device)

    def set_int4(
        self,
        u: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        group: int,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        device: str,
    ) -> None:
        """int4 groups: w = (u − 8)·scale + zero, u uint8 [out, in] in 0..15, scale and zero [out, in/group]."""
        u, scale, zero = u.to(device), scale.to(device).float(), zero.to(device).float()
        self.group = group
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()  # [in/group, out, 2]
        dense = ((u.float() - 8).reshape(self.out_features, -1, group) * scale[..., None] + zero[..., None]).reshape(
            self.out_features, self.in_features
        )
        candidates = ["int4pack_cuda", "int4pack_cuda_swapped"] if device.startswith("cuda") else ["int4pack_cpu"]
        self._choose([(k, (u, sz)) for k in candidates], bias, dtype, device, dense)

    def _choose(
        self,
        candidates: list[tuple[str, tuple[torch.Tensor, torch.Tensor]]],
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        device: str,
        dense: torch.Tensor,
    ) -> None:
        """Keep the first kernel that agrees with the dense weights on this device; else the plain path."""
        self.bias = None if bias is None else nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
        for kernel, weights in candidates:
            try:
                self._store(kernel, *weights)
                if self._agrees(dense, dtype, device):
                    self._check_dense(dense, dtype, device)
                    self.set_dense(dtype)
                    return
            except (RuntimeError, NotImplementedError) as exc:  # not built for this device, dtype or shape
                log.debug("%s kernel unavailable for %s: %s", kernel, self.extra_repr(), exc)
        kernel, (first, second) = candidates[0]
        self._store("dequantize", first, second)

    def _check_dense(self, dense: torch.Tensor, dtype: torch.dtype, device: str) -> None:
        """A dequantized copy can serve many rows where the kernel is a CPU one and the copy equals the weights."""
        self.unpacks = False
        if device == "cpu" and self.kernel in ("int8pack", "int4pack_cpu"):
            try:
                copy = self._dense_now(dtype).float()
            except (RuntimeError, ValueError) as exc:  # a packed layout `_dense_now` cannot read
                log.debug("no dense path for %s: %s", self.extra_repr(), exc)
                return
            self.unpacks = bool(torch.allclose(copy, dense, rtol=2e-2, atol=1e-2 * float(dense.abs().max())))

    def _store(self, kernel: str, first: torch.Tensor, second: torch.Tensor) -> None:
        for name in ("weight", "scale", "packed", "scales_zeros"):
            self._buffers.pop(name, None)
        self.kernel = kernel
        self._few = None
        self.int8 = None
        if kernel == "int8pack":
            self.register_buffer("weight", first.contiguous())  # int8 [out, in]
            self.register_buffer("scale", second)  # [out]
        elif kernel == "int4pack_cpu":  # first: u [out, in]; second: scales and zeros [in/group, out, 2]
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(first.to(torch.int32), 1))
            self.register_buffer("scales_zeros", second)
        elif kernel.startswith("int4pack_cuda"):
            # which nibble of a byte the CUDA tile packer reads first is not documented: `_agrees` decides
            even, odd = first[:, 0::2], first[:, 1::2]
            hi, lo = (even, odd) if kernel == "int4pack_cuda" else (odd, even)
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack((hi << 4) | lo, 8))
            self.register_buffer("scales_zeros", second)
        elif self.bits == 8:  # the plain path: dequantize, then an ordinary matmul
            self.register_buffer("weight", first.contiguous())
            self.register_buffer("scale", second)
        else:
            self.register_buffer("weight", pack_int4(first.to(torch.int8) - 8))
            self.register_buffer("scales_zeros", second)

    def _agrees(self, dense: torch.Tensor, dtype: torch.dtype, device: str) -> bool:
        x = torch.randn(2, self.in_features, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
        want = x.float() @ dense.t()
        got = self._matmul(x).float()
        return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()) + 1e-6))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] → [M, out] without bias."""
        b = self._buffers
        out: torch.Tensor
        if self.kernel == "int8pack":
            out = KERNELS["int8pack"](x, b["weight"], b["scale"])
        elif self.kernel == "int4pack_cpu":
            scales = b["scales_zeros"]  # a fused layer's part holds a view of its scales: the kernel needs them whole
            assert scales is not None
            out = KERNELS["int4pack_cpu"](x, b["packed"], self.group, scales.contiguous())
        elif self.kernel.startswith("int4pack_cuda"):
            out = KERNELS["int4pack_cuda"](x, b["packed"], self.group, b["scales_zeros"])
        else:
            out = F.linear(x, self.dense_weight().to(x.dtype))
        return out

    def _dense_now(self, dtype: torch.dtype) -> torch.Tensor:
        """The weights [out, in] in `dtype`, unpacked from the kernel's own format for one call."""
        b = self._buffers
        if self.kernel == "int8pack":
            weight, scale = b["weight"], b["scale"]
            assert weight is not None and scale is not None
            return weight.to(dtype) * scale.to(dtype)[:, None]
        packed, sz = b["packed"], b["scales_zeros"]
        assert packed is not None and sz is not None
        layout = int4_cpu_layout()  # the tile format differs with the instruction set; `_check_dense` verifies
        if layout is None:
            raise ValueError("unknown int4 tile layout on this CPU")
        n, k = self.out_features, self.in_features
        u = read_int4_cpu(packed, n, k, layout).reshape(n, k // self.group, self.group)
        s = sz.transpose(0, 1).to(dtype)  # [out, in/group, (scale, zero)]
        return ((u.to(dtype) - 8) * s[..., :1] + s[..., 1:]).reshape(n, k)

    def dense_weight(self) -> torch.Tensor:
        """The plain path's weights as a float tensor [out, in]."""
        weight = self._buffers["weight"]
        assert weight is not None
        if self.bits == 8:
            scale = self._buffers["scale"]
            assert scale is not None
            return weight.float() * scale.float()[:, None]
        sz = self._buffers["scales_zeros"]
        assert sz is not None
        q = unpack_int4(weight).float().reshape(self.out_features, -1, self.group)
        return (q * sz[..., 0].t().float()[..., None] + sz[..., 1].t().float()[..., None]).reshape(
            self.out_features, self.in_features
        )

    def few_rows(self, cast_back: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """This layer for the few rows of a decode step, as one function with the kernel, its buffers and the casts
        bound once: a step calls some 200 layers, and a module call's bookkeeping costs about a tenth of a small
        kernel's time (`bench/lean_decode.py`). With `cast_back` off the output stays in the dtype the kernel
        computes in: a caller that adds it to a float32 residual or multiplies it by float32 rotary factors gets the
        same numbers by type promotion, without a cast of its own (a tenth of a small kernel's time again, three
        times a layer). Made again when the weights or the route change."""
        if self._few is None:
            self._few = self._bind()
        return self._few[0 if cast_back else 1]

    def _bind(
        self,
    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        b, act, out, bias = self._buffers, self.act, self.out_features, self.bias
        if self.exact_top and (self.int8 is not None or act in (torch.bfloat16, torch.float16)):
            return self.forward, self.forward  # the LM head, once a step: its bookkeeping does not count
        args: tuple[Any, ...]
        if self.kernel == "int8pack":
            kernel, args = KERNELS["int8pack"], (b["weight"], b["scale"])
        elif self.kernel == "int4pack_cpu" and b["scales_zeros"] is not None and b["scales_zeros"].is_contiguous():
            kernel, args = KERNELS["int4pack_cpu"], (b["packed"], self.group, b["scales_zeros"])
        else:  # the plain path, or a fused layer's part whose scales are a view
            return self.forward, self.forward
        assert act is not None

        def raw(x: torch.Tensor) -> torch.Tensor:
            y = kernel(x.reshape(-1, x.shape[-1]).to(act).contiguous(), *args)
            if bias is not None:
                y = y + bias.to(y.dtype)
            return y.view(*x.shape[:-1], out)

        def few(x: torch.Tensor) -> torch.Tensor:
            return raw(x).to(x.dtype)

        return few, raw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        if self.int8 is not None:
            y = self.int8(rows)
            if self.bias is not None:
                y = y + self.bias.float()
            return self._exact(rows, y, EXACT_TOP_INT8).reshape(*shape[:-1], self.out_features)  # float32 logits
        # which way a call goes depends on each sequence's tokens, never on how many sequences share it: a prompt
        # prefilled beside others takes the way it takes alone (a 2-D input is one sequence of rows)
        tokens = shape[-2] if x.dim() >= 3 else rows.shape[0]
        held = _HELD.get() if tokens >= HELD_ROWS else None
        dtype = self.held if held is not None else self.dense
        if dtype is not None and tokens >= (DENSE_ROWS if held is None else HELD_ROWS):
            weight = None if held is None else held.get(self)
            if weight is None:
                weight = self._dense_now(dtype)
                if held is not None:
                    held[self] = weight
            y = F.linear(rows.to(dtype), weight, None if self.bias is None else self.bias.to(dtype))
        else:
            y = self._matmul(rows.to(self.act or x.dtype).contiguous())
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            if self.exact_top and y.dtype in (torch.bfloat16, torch.float16):
                return self._exact(rows, y).reshape(*shape[:-1], self.out_features)  # float32 logits
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


class QuantizedEmbedding(nn.Module):
    """An embedding table held as int8 rows with one scale each; a lookup dequantizes only the rows it reads. With
    tied embeddings the rows are the LM head's own int8 weights: one copy serves both."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype  # of the vectors it returns: the model's, whatever dtype the scales are kept in
        self.register_buffer("weight", q)  # int8 [V, H]
        self.register_buffer("scale", scale)  # [V]
        self.num_embeddings, self.embedding_dim = q.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight, scale = self._buffers["weight"], self._buffers["scale"]
        assert weight is not None and scale is not None
        return weight[ids].to(self.dtype) * scale[ids].to(self.dtype)[..., None]


def quantize_linear(linear: nn.Linear, bits: int, group: int, dtype: torch.dtype, device: str) -> QuantizedLinear:
    """A float nn.Linear as int8 rows or int4 groups (rows when the width does not split into groups)."""
    quantized = QuantizedLinear(linear.in_features, linear.out_features, bits)
    bias = None if linear.bias is None else linear.bias.data
    weight = linear.weight.data
    if bits == 8:
        q, scale = int8_rows(weight)
        quantized.set_weights(q, scale, bias, dtype, device)
    else:
        size = group if linear.in_features % group == 0 else next(g for g in GROUP_SIZES if linear.in_features % g == 0)
        u, scale, low = quantize_groups(weight, size)
        quantized.set_int4(u, scale, low + 8 * scale, size, bias, dtype, device)
    return quantized


def quantize_model(
    model: Any, bits: int, group: int, dtype: torch.dtype, device: str, bits_of: dict[str, int] | None = None
) -> None:
    """Every linear layer of a Hugging Face causal LM to int8 rows or int4 groups (`bits`, or each layer's own in
    `bits_of`, where 16 leaves it as it is), its LM head to int8 rows (the layer answers are most sensitive to; GGUF
    files keep it at 6 or 8 bits too) and its input embeddings to int8 rows (tied embeddings get a copy of each
    kind). A layer whose width does not split into int4's groups of 32 stays as it is."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = isinstance(head, nn.Linear) and isinstance(embeddings, nn.Embedding) and head.weight is embeddings.weight
    quantized_head = None
    for name, linear in list(model.named_modules()):
        if not isinstance(linear, nn.Linear):
            continue
        layer_bits = 8 if linear is head else (bits_of or {}).get(name, bits)
        if layer_bits == 8 or (layer_bits == 4 and linear.in_features % GROUP_SIZES[-1] == 0):
            quantized = quantize_linear(linear, layer_bits, group, dtype, device)
            if linear is head:
                quantized.keep_top_exact()
            _replace(model, name, quantized)
            quantized_head = quantized if linear is head else quantized_head
    if not isinstance(embeddings, nn.Embedding):
        return
    rows = quantized_head._buffers if tied and quantized_head is not None else {}
    q_rows, scales = rows.get("weight"), rows.get("scale")
    if q_rows is not None and scales is not None and q_rows.dtype == torch.int8:
        lookup = QuantizedEmbedding(q_rows, scales, dtype)  # the head's int8 rows serve lookups too
    else:
        q, scale = int8_rows(embeddings.weight)
        lookup = QuantizedEmbedding(q.to(device), scale.to(device=device, dtype=dtype), dtype)
    _replace(model, _name_of(model, embeddings), lookup)


def _name(dtype: torch.dtype | None) -> str:
    return "-" if dtype is None else str(dtype).removeprefix("torch.")


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(str(name) for name, m in model.named_modules() if m is module)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def replace_with_empty(model: nn.Module, names: Iterable[str], bits: int) -> None:
    """Put empty QuantizedLinear modules (filled later, e.g. by a checkpoint reader) in place of named nn.Linear."""
    for name in names:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        _replace(model, name, QuantizedLinear(linear.in_features, linear.out_features, bits))
