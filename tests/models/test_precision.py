"""Precision and size for every model: `--dtype` (bf16 where the CPU has it), `--quantize 16/8/4` on PyTorch's
weight-only kernels, a GGUF file served at its own level or above, and the batch size memory affords."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from api.config import BACKEND
from backends.local import LocalBackend
from generation import batch
from generation.prepare import load_model
from models import calibrate, devices
from models.devices import default_batch_size, resolve_dtype
from models.loader import LoadedModel, ModelConfig
from models.packing import int4_cpu_layout
from models.quantize import DENSE_ROWS, HELD_ROWS, QuantizedEmbedding, QuantizedLinear, quantize_linear
from tests.conftest import MakeClient, build_tiny_gguf
from tests.server.test_cli import NO_GPU, run_cli

FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic avx2 avx512f avx512bw"


def count_unpacks(monkeypatch: pytest.MonkeyPatch) -> list[QuantizedLinear]:
    """From now on, each layer that unpacks its weights into a dense copy, once per time it does."""
    unpacked: list[QuantizedLinear] = []
    original = QuantizedLinear._dense_now

    def counted(self: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
        unpacked.append(self)
        return original(self, dtype)

    monkeypatch.setattr(QuantizedLinear, "_dense_now", counted)
    return unpacked


@pytest.mark.parametrize(
    ("flags", "capability", "want"),
    [
        (FLAGS, "AVX512", torch.float32),
        (FLAGS + " avx512_bf16", "AVX512", torch.bfloat16),
        # the flags say bf16, but PyTorch dispatches to AVX2 code (ATEN_CPU_CAPABILITY=avx2, how the tests emulate an
        # AVX2-only CPU): bf16 would be emulated there
        (FLAGS + " avx512_bf16", "AVX2", torch.float32),
    ],
)
def test_auto_dtype_follows_the_cpus_bf16_support(
    flags: str, capability: str, want: torch.dtype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(devices, "CPUINFO", cpuinfo)  # the capability probe reads this file
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert resolve_dtype("auto", "cpu") == want
    assert resolve_dtype("float32", "cpu") == torch.float32 and resolve_dtype("float16", "cpu") == torch.float16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtype_overrides_the_default(dtype: str, tiny_dir: Path) -> None:
    lm = load_model(ModelConfig(path=tiny_dir, device="cpu", dtype=dtype))
    assert lm.dtype == dtype and next(lm.model.parameters()).dtype == getattr(torch, dtype)


@pytest.fixture(scope="module")
def sizes(tiny_dir: Path) -> dict[int, LoadedModel]:
    return {
        bits: load_model(ModelConfig(path=tiny_dir, device="cpu", dtype="float32", quantize=bits))
        for bits in (16, 8, 4)
    }


def test_quantized_weights_are_smaller_and_run_on_the_weight_only_kernels(sizes: dict[int, LoadedModel]) -> None:
    assert sizes[16].weight_bytes > sizes[8].weight_bytes > sizes[4].weight_bytes
    for bits in (8, 4):
        model = sizes[bits].model
        assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
        kernels = {m.kernel for m in model.modules() if isinstance(m, QuantizedLinear)}
        assert kernels == ({"int8pack"} if bits == 8 else {"int4pack_cpu", "int8pack"})  # int8: the LM head
        assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
        assert sizes[bits].bits == bits


@pytest.mark.parametrize("bits", [8, 4])
async def test_quantized_models_answer_deterministically_alone_and_in_a_batch(
    bits: int, sizes: dict[int, LoadedModel], make_client: MakeClient
) -> None:
    client = await make_client(sizes[bits])
    bodies = [{"query": q, "temperature": 0, "max_tokens": 16, "ignore_eos": True} for q in ("你好", "hello", "a b c")]

    async def answer(body: dict[str, Any]) -> str:
        response = await client.post("/chat", json=body)
        assert response.status == 200
        return str((await response.json())["response"])

    alone = [await answer(b) for b in bodies]
    assert alone == [await answer(b) for b in bodies]  # greedy is deterministic
    assert list(await asyncio.gather(*(answer(b) for b in bodies))) == alone  # and batch-invariant
    assert all(alone)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("width", [192, 96])  # 96: not whole blocks of the AVX-512 int4 tile format's 64 rows
def test_prefill_sized_inputs_use_the_same_weights_as_decoding(bits: int, width: int) -> None:
    """Many rows at once (a prefill chunk) go through a dequantized copy on a CPU, a row at a time through the
    kernel: both compute with the same quantized weights, whichever tile format this CPU's kernels pack int4 in."""
    torch.manual_seed(0)
    layer = quantize_linear(torch.nn.Linear(256, width), bits, 32, torch.bfloat16, "cpu")
    layout = int4_cpu_layout()
    assert layout is not None  # every instruction set PyTorch dispatches to on x86 packs one of the known ways
    rows_per_tile = layout[0] if bits == 4 else 1
    assert layer.unpacks == (width % rows_per_tile == 0) and layer.dense == (torch.bfloat16 if layer.unpacks else None)
    x = torch.randn(DENSE_ROWS + 3, 256).bfloat16()
    together = layer(x).float()
    alone = torch.cat([layer(row[None]) for row in x]).float()
    assert torch.allclose(together, alone, atol=2e-2 * float(alone.abs().max()))


@pytest.mark.parametrize("bits", [8, 4])
def test_a_chunked_prompt_dequantizes_the_weights_once(
    bits: int, sizes: dict[int, LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunks of one prompt share one dequantized copy of the weights while it lasts (where a quarter of the
    free memory holds it), the short ones deep in the prompt too, and free it with the last chunk; the answer is
    the one they get dequantizing each time."""
    pieces = [DENSE_ROWS, 2 * HELD_ROWS, DENSE_ROWS]  # the middle one alone would run on the kernels
    # without the copy a model keeps for prefills where memory allows (test below)
    lm, prompt = dataclasses.replace(sizes[bits], prefill_copy=None), [10 + i % 300 for i in range(sum(pieces))]
    dense = [m for m in lm.model.modules() if isinstance(m, QuantizedLinear) and m.unpacks]
    assert dense
    for m in dense:  # the route where a copy serves many rows (the calibration may have chosen the kernel)
        monkeypatch.setattr(m, "dense", torch.float32)
        monkeypatch.setattr(m, "held", torch.float32)
    unpacked = count_unpacks(monkeypatch)

    def chunked() -> tuple[torch.Tensor, Any]:
        cache, start = None, 0
        with torch.inference_mode():
            for size in pieces:
                more = len(prompt) - start - size
                logits, cache = batch.prefill_chunk(lm, prompt[start : start + size], cache, more)
                start += size
        return logits, cache

    shared, cache = chunked()
    once = len(unpacked)
    assert once >= len(dense) - 1 and len(set(unpacked)) == once  # all but the LM head, which sees one row
    assert getattr(cache, batch.HELD) is None
    unpacked.clear()
    monkeypatch.setattr(batch, "free_memory", lambda devices: 0)  # no room: each chunk dequantizes for itself
    each, _ = chunked()
    assert len(unpacked) == 2 * once
    assert torch.allclose(shared, each, atol=2e-2 * float(each.abs().max()))


@pytest.mark.parametrize("bits", [8, 4])
def test_a_model_keeps_a_prefill_copy_where_memory_allows(
    bits: int, sizes: dict[int, LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a dense matmul measured faster than the kernels for a prompt's rows, the model keeps dequantized copies
    (a quarter of the free memory at most): prefills and chunks then dequantize nothing, and answer as a copy made
    for the call does."""
    lm = sizes[bits]
    layers = [m for m in lm.model.modules() if isinstance(m, QuantizedLinear) and m.held is not None]
    if not layers:
        pytest.skip("no layer measured faster with a dense copy on this CPU")
    assert lm.prefill_copy is not None and set(lm.prefill_copy) == set(layers)
    prompt = [10 + i % 300 for i in range(DENSE_ROWS + 7)]
    with torch.inference_mode():
        kept, _, _ = batch.prefill(lm, [prompt])
        unpacked = count_unpacks(monkeypatch)
        assert torch.equal(batch.prefill(lm, [prompt])[0], kept) and not unpacked
        fresh, _, _ = batch.prefill(dataclasses.replace(lm, prefill_copy={}), [prompt])  # copies made for the call
    assert unpacked and torch.allclose(fresh, kept, atol=1e-3 * float(kept.abs().max()))


@pytest.mark.parametrize(("quant", "bits"), [(None, 16), ("Q8_0", 8), ("Q4_1", 4)])
def test_a_gguf_file_is_served_at_its_own_level_or_the_one_measured_fastest(
    quant: str | None, bits: int, tmp_path: Path
) -> None:
    """The file's own width is where the measurement starts: never fewer bits (that would lose what the file kept),
    more where they measure faster here; the choice is kept with the converted copy, and `--quantize` overrides."""
    path = build_tiny_gguf(tmp_path, quant)
    lm = load_model(ModelConfig(path=path, device="cpu", cache_dir=tmp_path / "cache"))
    again = load_model(ModelConfig(path=path, device="cpu", cache_dir=tmp_path / "cache"))  # from the copy
    if bits == 16:
        assert lm.bits == again.bits == 16 and lm.kernels is None  # nothing to choose
    else:
        assert lm.kernels is not None and again.kernels is not None
        measured = {int(b): step for b, step in lm.kernels["step_us"].items() if b != "chosen"}
        assert set(measured) == {b for b in (4, 8, 16) if b >= bits}
        assert lm.bits == calibrate.choose(measured) and again.bits == lm.bits and again.kernels["cached"]
    plain = load_model(ModelConfig(path=path, device="cpu", cache_dir=tmp_path / "cache", quantize=16))
    assert plain.bits == 16 and (plain.weight_bytes > lm.weight_bytes) == (lm.bits < 16)


def test_the_batch_size_follows_memory() -> None:
    per_token = 23_040  # SmolLM2-135M in bf16
    assert default_batch_size(per_token, 8192, 20 << 30) == 56  # half of 20 GiB at 189 MB a request
    assert default_batch_size(per_token, 8192, 1 << 30) == 2
    assert default_batch_size(per_token, 8192, 100 << 30) == 64  # a CPU gains little past that
    assert default_batch_size(458_752, 2048, 10 << 30) == 5  # ChatGLM-6B in 16 bits with 10 GiB left on its GPU


async def test_health_reports_precision_and_batch(make_client: MakeClient, sizes: dict[int, LoadedModel]) -> None:
    client = await make_client(sizes[4], max_batch_size=None)
    body = await (await client.get("/health")).json()
    assert body["bits"] == 4 and body["dtype"] == "float32" and body["weight_bytes"] == sizes[4].weight_bytes
    backend = client.app[BACKEND]
    assert isinstance(backend, LocalBackend) and body["max_batch_size"] == sizes[4].batch_size == backend.max_batch_size


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "1"], "this torch build sees no CUDA device (use --device cpu)"),
        (["--quantize", "8", "--device", "0,1"], "this torch build sees no CUDA device"),
        (["--dtype", "float64"], "invalid choice"),
    ],
    ids=["missing-gpu", "quantized-over-gpus", "dtype"],
)
def test_impossible_combinations_are_one_line_at_start_up(args: list[str], message: str, tiny_dir: Path) -> None:
    result = run_cli("--model", str(tiny_dir), *args, env=NO_GPU)  # as on a machine without CUDA
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
