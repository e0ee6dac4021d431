"""`--quantize 8/4` for ChatGLM-6B: the original's integers, fast kernels, pre-quantized checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from generation.prepare import load_model
from models.chatglm.chatglm6b_loader import load
from models.loader import LoadedModel, ModelConfig
from models.packing import pack_int4, quantize_rows, unpack_int4
from models.quantize import QuantizedLinear
from tests.glm import GOLDEN, QUANTIZED, golden, golden_weights, quantized_weights, write_bin_checkpoint, write_config

CASES = golden("cases.json")["cases"]
STEP_LOGITS = load_file(GOLDEN / "cases_tensors.safetensors")
REFERENCE = load_file(GOLDEN / "quantization_layer0_qkv.safetensors")


@pytest.mark.parametrize("bits", [8, 4])
def test_integers_and_scales_are_the_originals_bit_for_bit(bits: int) -> None:
    q, scale = quantize_rows(REFERENCE["weight_fp16"], bits)
    want_q = REFERENCE["int8.weight"] if bits == 8 else REFERENCE["int4.weight_unpacked"]
    assert torch.equal(scale, REFERENCE[f"int{bits}.weight_scale"]) and scale.dtype == torch.float16
    assert torch.equal(q, want_q) and q.dtype == torch.int8
    if bits == 4:
        assert int(q.min()) >= -7 and int(q.max()) <= 7


def test_int4_packing_puts_the_even_column_in_the_high_nibble() -> None:
    q = REFERENCE["int4.weight_unpacked"]
    packed = pack_int4(q)
    assert packed.shape == (q.shape[0], q.shape[1] // 2) and packed.dtype == torch.int8
    high, low = packed.int() >> 4, ((packed.int() & 0xF) ^ 8) - 8
    assert torch.equal(high, q[:, 0::2].int()) and torch.equal(low, q[:, 1::2].int())
    assert torch.equal(unpack_int4(packed), q)


def dequantized_reference(bits: int) -> torch.nn.Module:
    """The fp32 model with each quantized layer's weight replaced by q·scale: what quantized compute must give."""
    model, _, _ = load(GOLDEN, "cpu", torch.float32, 16)
    for name, module in model.named_modules():
        if any(name.endswith(layer) for layer in QUANTIZED):
            q, scale = quantize_rows(module.weight.data, bits)
            module.weight.data = q.float() * scale.float()[:, None]
    return model


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_compute_equals_dequantize_then_matmul(bits: int) -> None:
    quantized, _, _ = load(GOLDEN, "cpu", torch.float32, bits)
    kernels = {m.kernel for m in quantized.modules() if isinstance(m, QuantizedLinear)}
    assert kernels == {"int8pack" if bits == 8 else "int4pack_cpu"}  # PyTorch's weight-only kernels, not a fallback
    reference = dequantized_reference(bits)
    for case in CASES:
        ids = torch.tensor(case["input_ids"])
        with torch.no_grad():
            assert (quantized(ids).logits - reference(ids).logits).abs().max() < 1e-3


def test_int8_keeps_the_greedy_answers_where_the_margin_allows() -> None:
    """int8 moves the tiny model's logits by up to ~0.8; a greedy step can only flip where the fp32 model's top two
    tokens are closer than that. Every case must follow the original's tokens up to such a step."""
    quantized, _, _ = load(GOLDEN, "cpu", torch.float32, 8)
    followed = []
    for case in CASES:
        ids = torch.tensor(case["input_ids"])
        tokens = quantized.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :].tolist()
        want = case["greedy_new_tokens"]
        if tokens == want:
            followed.append(case["name"])
            continue
        step = next(i for i, (a, b) in enumerate(zip(tokens, want, strict=True)) if a != b)
        top2 = STEP_LOGITS[f"{case['name']}.greedy_step_logits"][step, 0].topk(2).values
        assert float(top2[0] - top2[1]) < 0.2, f"{case['name']} left the original's tokens at a clear step {step}"
    assert followed == ["len5", "len40", "mask_mid"]  # len12's first step has a margin of 0.128


@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_quantized_model_is_small_deterministic_and_batch_invariant(bits: int) -> None:
    plain, _, _ = load(GOLDEN, "cpu", torch.bfloat16, 16)
    quantized, _, _ = load(GOLDEN, "cpu", torch.bfloat16, bits)
    layers = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 8 and {m.kernel for m in layers} == {"int8pack" if bits == 8 else "int4pack_cpu"}
    quantized_bytes = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
    plain_bytes = sum(m.weight.numel() * 2 for n, m in plain.named_modules() if any(n.endswith(q) for q in QUANTIZED))
    assert quantized_bytes < plain_bytes * (0.55 if bits == 8 else 0.3)
    prompts = [torch.tensor(c["input_ids"]) for c in CASES[:3]]
    alone = [quantized.generate(p, max_new_tokens=8, do_sample=False)[0, p.shape[1] :].tolist() for p in prompts]
    again = [quantized.generate(p, max_new_tokens=8, do_sample=False)[0, p.shape[1] :].tolist() for p in prompts]
    assert alone == again
    width = max(p.shape[1] for p in prompts)
    batch = torch.stack([torch.cat([torch.full((width - p.shape[1],), 3), p[0]]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - p.shape[1] for p in prompts]).long()
    together = quantized.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)[:, width:]
    assert together.tolist() == alone


@pytest.mark.parametrize("bits", [8, 4])
def test_a_checkpoint_published_quantized_loads_and_generates(bits: int, tmp_path: Path) -> None:
    folder = write_bin_checkpoint(tmp_path / f"int{bits}", quantized_weights(bits))
    write_config(folder, quantization_bit=bits)
    published = load_model(ModelConfig(path=folder, device="cpu", dtype="float32"))
    on_the_fly = load_model(ModelConfig(path=GOLDEN, device="cpu", dtype="float32", quantize=bits))
    assert published.weight_bytes == on_the_fly.weight_bytes
    ids = torch.tensor(CASES[0]["input_ids"])
    generated = published.model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(generated, on_the_fly.model.generate(ids, max_new_tokens=16, do_sample=False))
    if bits == 8:  # the published integers are served as they are
        layer = published.model.transformer.layers[0].attention.query_key_value
        q, _ = quantize_rows(golden_weights()["transformer.layers.0.attention.query_key_value.weight"], bits)
        assert torch.equal(layer.weight, q)


def test_quantizing_shrinks_the_reported_weight_bytes(glm_lm: LoadedModel) -> None:
    sizes = {
        bits: load_model(ModelConfig(path=GOLDEN, device="cpu", dtype="bfloat16", quantize=bits)).weight_bytes
        for bits in (16, 8, 4)
    }
    assert glm_lm.weight_bytes == 2 * sizes[16]  # fp32 against bf16
    assert sizes[16] > sizes[8] > sizes[4]
