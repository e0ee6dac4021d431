"""The kernels a CPU serves with are measured at load (models/calibrate.py): the faster wins, the choice is kept per CPU
and model, `--quantize`/`--dtype` override it; every quantized path answers as its own dequantized weights do; fused
projections hold nothing twice; the thread count follows the measured speed of the steps."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from generation import lean
from generation.batch import KVBatch, decode_step, prefill
from generation.prepare import load_model
from generation.threads import ThreadTuner, candidates
from models import devices, int8_inputs, packing, quantize
from models.loader import LoadedModel, ModelConfig, weight_bytes
from models.quantize import QuantizedLinear
from tests.conftest import MakeClient, build_tiny_gguf


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gguf(tmp_path_factory.mktemp("q4"), "Q4_1")


def slowed(kernel: str, when: Callable[[torch.Tensor], bool] = lambda x: True) -> Callable[..., torch.Tensor]:
    """The kernel as it is, made 2 ms slower per call where `when(input)` holds: a slow path on purpose."""
    original = quantize.KERNELS[kernel]

    def slow(x: torch.Tensor, *args: Any) -> torch.Tensor:
        if when(x):
            time.sleep(0.002)
        return original(x, *args)

    return slow


def slow_product(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """The LM head's int8 × int8 product, 2 ms slower a call."""
    time.sleep(0.002)
    return int8_inputs._product(x, packed)


def is_dtype(dtype: torch.dtype, x: torch.Tensor) -> bool:
    return x.dtype == dtype


def quantized_layers(lm: LoadedModel) -> list[QuantizedLinear]:
    return [m for m in lm.model.modules() if isinstance(m, QuantizedLinear)]


def test_the_faster_weight_format_wins_when_int4_is_slowed(
    q4_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = load_model(ModelConfig(path=q4_gguf, device="cpu", cache_dir=tmp_path / "a"))
    assert fast.kernels is not None and set(fast.kernels["step_us"]) == {"4", "8", "16", "chosen"}  # 4 bits and up
    monkeypatch.setitem(quantize.KERNELS, "int4pack_cpu", slowed("int4pack_cpu"))
    lm = load_model(ModelConfig(path=q4_gguf, device="cpu", cache_dir=tmp_path / "b"))
    assert lm.kernels is not None and not lm.kernels["cached"]
    step = lm.kernels["step_us"]
    assert lm.bits in (8, 16) and step["4"]["1"] > step[str(lm.bits)]["1"] + 1000  # two layers at 2 ms and more
    assert all(m.kernel != "int4pack_cpu" for m in quantized_layers(lm))


def test_a_slow_activation_dtype_is_not_chosen(q4_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels can be fed float32 or bf16 (cast around the call); the one made slow here loses, shape by shape."""
    for slow_dtype, fast_dtype in ((torch.bfloat16, "float32"), (torch.float32, "bfloat16")):
        for kernel in ("int4pack_cpu", "int8pack"):
            monkeypatch.setitem(quantize.KERNELS, kernel, slowed(kernel, partial(is_dtype, slow_dtype)))
        monkeypatch.setitem(int8_inputs.KERNELS, "int8x8", slow_product)  # the LM head's int8 inputs: test_int8_inputs
        lm = load_model(ModelConfig(path=q4_gguf, device="cpu", cache_dir=None, quantize=4))
        assert lm.kernels is not None and lm.bits == 4
        assert {layer["act"] for layer in lm.kernels["layers"].values()} == {fast_dtype}
        assert {m.act for m in quantized_layers(lm)} == {getattr(torch, fast_dtype)}
        monkeypatch.undo()


def test_the_choice_is_kept_per_cpu_and_model(
    q4_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = ModelConfig(path=q4_gguf, device="cpu", cache_dir=tmp_path)
    first = load_model(config)
    assert first.kernels is not None and not first.kernels["cached"]
    # a slower kernel now does not change a kept choice: it is read, not measured again
    monkeypatch.setitem(quantize.KERNELS, "int4pack_cpu", slowed("int4pack_cpu"))
    monkeypatch.setitem(quantize.KERNELS, "int8pack", slowed("int8pack"))
    again = load_model(config)
    assert again.kernels is not None and again.kernels["cached"] and again.bits == first.bits
    assert again.kernels["layers"] == first.kernels["layers"]
    monkeypatch.undo()
    # another CPU (same flags, another model name): measured again
    cpuinfo = tmp_path / "cpuinfo"
    flags = " ".join(sorted(devices.cpu_flags()))
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Another CPU\nflags\t\t: {flags}\n")
    monkeypatch.setattr(devices, "CPUINFO", cpuinfo)
    other_cpu = load_model(config)
    assert other_cpu.kernels is not None and not other_cpu.kernels["cached"]
    assert load_model(config).kernels["cached"]  # type: ignore[index]
    # the same file changed (a new download in its place): measured again
    os.utime(q4_gguf, ns=(time.time_ns(), time.time_ns()))
    with caplog.at_level(logging.INFO, logger="models.calibrate"):
        changed = load_model(config)
    assert changed.kernels is not None and not changed.kernels["cached"] and "measuring" in caplog.text


def test_quantize_and_dtype_override_the_measurement(
    q4_gguf: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(quantize.KERNELS, "int4pack_cpu", slowed("int4pack_cpu"))
    with caplog.at_level(logging.WARNING, logger="models"):
        lm = load_model(ModelConfig(path=q4_gguf, device="cpu", quantize=4))
    assert lm.bits == 4 and lm.kernels is not None and lm.kernels["forced"] == "--quantize 4"
    assert "--quantize 4: 4-bit weights measure" in caplog.text and "slower here than the fastest path" in caplog.text
    monkeypatch.undo()
    lm = load_model(ModelConfig(path=q4_gguf, device="cpu", dtype="float32", quantize=4))
    assert lm.dtype == "float32" and lm.kernels is not None and lm.kernels["forced"] == "--quantize 4 --dtype float32"
    assert {layer["act"] for layer in lm.kernels["layers"].values()} == {"float32"}
    assert all(layer["dense"] in (None, "float32") for layer in lm.kernels["layers"].values())


async def test_health_says_what_was_chosen_and_measured(make_client: MakeClient, q4_gguf: Path) -> None:
    lm = load_model(ModelConfig(path=q4_gguf, device="cpu"))
    client = await make_client(lm)
    body = await (await client.get("/health")).json()
    kernels = body["kernels"]
    assert body["bits"] == kernels["bits"] == lm.bits and body["threads"] >= 1 and body["tuned"] is True
    assert body["prefill_tokens_per_step"] >= 16
    for shape, layer in kernels["layers"].items():
        assert layer["count"] >= 1 and layer["us"]["1"] > 0 and layer["us"]["16"] > 0, shape
    assert set(kernels["step_us"]) >= {str(lm.bits)}


# ---- every path answers as its own weights do --------------------------------------------------------------------


def greedy_agreement(lm: LoadedModel, reference: LoadedModel, prompts: list[list[int]], steps: int) -> tuple[int, int]:
    """Greedy tokens of `lm`, fed back to both: (agreeing, clear) where `clear` counts the steps at which the
    reference's top two logits are more than 0.5 apart (a near-tie may fall either way under another rounding)."""
    agree = clear = 0
    with torch.inference_mode():
        for prompt in prompts:
            state: list[list[Any]] = []
            for model in (lm, reference):
                logits, cache, mask = prefill(model, [prompt])
                batch = KVBatch()
                batch.add(cache, mask)
                state.append([model, batch, logits[0]])
            for _ in range(steps):
                got, want = state[0][2], state[1][2]
                top = torch.topk(want, 2).values
                if float(top[0] - top[1]) > 0.5:
                    clear += 1
                    agree += int(got.argmax()) == int(want.argmax())
                token = int(want.argmax())
                for entry in state:
                    entry[2] = decode_step(entry[0], entry[1], [token])[0]
    return agree, clear


def dequantized(lm: LoadedModel) -> LoadedModel:
    """The same model with every quantized layer as a float32 nn.Linear of its own dequantized weights: the dense
    reference the paths are held to."""
    import copy
    import dataclasses

    model = copy.deepcopy(lm.model)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantizedLinear):
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            linear.weight.data = m._dense_now(torch.float32)
            if m.bias is not None and linear.bias is not None:
                linear.bias.data = m.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    return dataclasses.replace(lm, model=model, lean_decode=False)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_each_quantized_path_answers_as_its_dequantized_weights(
    bits: int, act: torch.dtype, bundled_cache: Path
) -> None:
    """On the bundled model: each kernel fed each dtype, and the dequantized copy for a prompt's many rows, gives the
    greedy tokens its own weights multiplied in float32 give, wherever those are not a near-tie."""
    lm = load_model(ModelConfig(device="cpu", cache_dir=bundled_cache, dtype="float32", quantize=bits))
    for m in quantized_layers(lm):
        m.set_act(act)
        m.set_dense(torch.float32)  # 128 rows and up (the second prompt): the copy
    lean.prepare(lm.model)  # the step binds the kernels as they are now
    reference = dequantized(lm)
    prompts = [lm.chat.encode([message("What is the capital of France?")]), list(range(200, 340))]
    agree, clear = greedy_agreement(lm, reference, prompts, 8)
    assert clear >= 8 and agree == clear


def message(text: str) -> Any:
    from models.chat_format import Message

    return Message("user", text)


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_quantized_rows_alone_and_together(act: torch.dtype, q4_gguf: Path) -> None:
    """A decode batch's rows each get what they get alone, from every kernel fed either dtype (the LM head's exact
    top logits too). A prefill chunk of 128 rows and more may take the dequantized copy, and a batch of rows is not
    a batch of prompts: padding and attention are tested with the models (test_batching.py)."""
    lm = load_model(ModelConfig(path=q4_gguf, device="cpu", dtype="float32", quantize=4))
    torch.manual_seed(0)
    for m in quantized_layers(lm):
        m.set_act(act)
        x = torch.randn(5, m.in_features)
        alone = torch.cat([m(row[None]) for row in x])
        assert torch.equal(alone, m(x)), m


def test_a_bound_kernel_left_in_its_own_dtype_holds_the_same_numbers(q4_gguf: Path) -> None:
    """The decode step's q/k/v, o and down projections skip the cast back to float32 (`few_rows(cast_back=False)`):
    their outputs stay in the dtype the kernel computes in, and widen to exactly what the layer answers."""
    lm = load_model(ModelConfig(path=q4_gguf, device="cpu", dtype="float32", quantize=4))
    torch.manual_seed(0)
    layers = [m for m in quantized_layers(lm) if not m.exact_top]
    assert layers
    for m in layers:
        m.set_act(torch.bfloat16)
        x = torch.randn(2, 1, m.in_features)
        kept, cast = m.few_rows(cast_back=False)(x), m.few_rows()(x)
        assert (
            kept.dtype == torch.bfloat16
            and cast.dtype == torch.float32
            and kept.shape == cast.shape == (2, 1, m.out_features)
        )
        assert torch.equal(kept.float(), cast) and torch.equal(cast, m(x)), m


# ---- fused projections -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_fused_projections_hold_no_second_copy(bits: int, q4_gguf: Path) -> None:
    """Each layer's q/k/v and gate/up run as one call in a decode step, on the layers' own weights: the model's
    memory is what it was before fusing, and the layers still answer prefills as before."""
    lm = load_model(ModelConfig(path=q4_gguf, device="cpu", dtype="float32", quantize=bits))
    layout = packing.int4_cpu_layout()
    assert layout is not None
    # the tiny model's k/v projections have 32 rows: int4 tiles of 64 rows (AVX-512) cannot be cut between them
    fusable = bits != 4 or 32 % layout[0] == 0
    assert lm.lean_decode and all((layer.qkv is not None) == fusable for layer in lean._PLANS[lm.model].layers)
    before = weight_bytes(lm.model)
    x = torch.randn(3, lm.model.config.hidden_size)
    q_proj = lm.model.model.layers[0].self_attn.q_proj
    out = q_proj(x)
    lean.prepare(lm.model)  # again: views of views, still one copy
    assert weight_bytes(lm.model) == before and torch.equal(q_proj(x), out)


# ---- threads -----------------------------------------------------------------------------------------------------


def test_thread_candidates() -> None:
    assert candidates(2) == [2, 1] and candidates(8) == [8, 7, 4, 1] and candidates(1) == [1]


def run_tuner(tuner: ThreadTuner, cost: Callable[[int], float], steps: int, rows: int = 1) -> list[int]:
    """Feed the tuner `steps` decode steps whose time at n threads is cost(n); the counts they ran at."""
    seen = []
    for _ in range(steps):
        tuner.before_decode(rows)
        n = torch.get_num_threads()
        seen.append(n)
        tuner.after_decode(rows, cost(n))
    return seen


def test_the_thread_count_follows_the_steps_speed() -> None:
    most = torch.get_num_threads()
    try:
        tuner = ThreadTuner(2, every=0.2)
        # a quiet machine: 2 threads are faster; the probes at 1 lose, and come further apart each time
        seen = run_tuner(tuner, {2: 0.010, 1: 0.016}.__getitem__, 200)
        assert tuner.current == 2 and 0 < seen.count(1) <= 12
        # another process takes a core: the steps at 2 slow down, a probe at 1 follows at once and wins
        seen = run_tuner(tuner, {2: 0.050, 1: 0.017}.__getitem__, 10)
        assert tuner.current == 1 and seen[-4:] == [1, 1, 1, 1]
        seen = run_tuner(tuner, {2: 0.050, 1: 0.017}.__getitem__, 60)
        assert seen.count(1) >= 50  # a probe at 2 now and then, further apart each time
        # quiet again: the next probe at 2 wins
        run_tuner(tuner, {2: 0.010, 1: 0.016}.__getitem__, 100)
        assert tuner.current == 2
        # a probe whose batch changes under it decides nothing
        tuner = ThreadTuner(2, every=0.0)
        run_tuner(tuner, {2: 0.010, 1: 0.001}.__getitem__, 3)
        tuner.before_decode(1)
        tuner.after_decode(2, 0.001)
        assert tuner.current == 2
        # --threads: never probed
        fixed = ThreadTuner(2, fixed=True, every=0.0)
        assert set(run_tuner(fixed, lambda n: 0.01, 30)) == {2}
    finally:
        torch.set_num_threads(most)
