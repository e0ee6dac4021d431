"""ChatGLM-6B's forward pass, positions, masks, cache and generation against the original's golden outputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from models.chatglm.chatglm6b_loader import load
from models.chatglm.chatglm6b_model import attention_bias, fix_invalid_scores, positions_2d, prompt_layout, rotary_table
from models.loader import LoadedModel
from tests.glm import GOLDEN, golden

CASES = golden("cases.json")
TENSORS = load_file(GOLDEN / "cases_tensors.safetensors")
BY_NAME = {c["name"]: c for c in CASES["cases"]}
TOLERANCE = 1e-4  # fp32 logits; an independent implementation of the spec lands near 2e-5


def ids_of(case: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(case["input_ids"])


@pytest.mark.parametrize("name", BY_NAME)
def test_forward_matches_the_original(name: str, glm_lm: LoadedModel) -> None:
    case = BY_NAME[name]
    with torch.no_grad():
        out = glm_lm.model(ids_of(case), output_hidden_states=True, use_cache=True)
    assert (out.logits - TENSORS[f"{name}.logits"]).abs().max() < TOLERANCE
    assert out.logits[0].argmax(-1).tolist() == case["argmax_per_position"]
    # every layer's input and the final LayerNorm's output
    hidden = torch.stack(out.hidden_states)
    assert (hidden - TENSORS[f"{name}.hidden_states"]).abs().max() < TOLERANCE
    # the cache holds keys after rotary; the original stores [S, B, n, d], we [B, n, S, d]
    for layer in range(2):
        keys, values = out.cache.layers[layer].keys, out.cache.layers[layer].values
        assert (keys.permute(2, 0, 1, 3) - TENSORS[f"{name}.present.{layer}.key"]).abs().max() < TOLERANCE
        assert (values.permute(2, 0, 1, 3) - TENSORS[f"{name}.present.{layer}.value"]).abs().max() < TOLERANCE


@pytest.mark.parametrize("name", BY_NAME)
def test_positions_and_prefix_mask_are_the_originals(name: str, glm_lm: LoadedModel) -> None:
    case = BY_NAME[name]
    ids = ids_of(case)
    real = torch.ones_like(ids, dtype=torch.bool)
    context, mask_pos = prompt_layout(ids, real, glm_lm.model.config)
    length = ids.shape[1] + 16  # the prompt and its 16 generated tokens
    position, block = positions_2d(torch.arange(length)[None], context, mask_pos)
    assert [position[0].tolist(), block[0].tolist()] == case["position_ids_after_generation"][0]
    bias = attention_bias(real, context, 0, ids.shape[1], torch.float32)
    assert bias is not None
    assert (bias[0, 0] < 0).long().tolist() == case["attention_mask_true_is_masked"]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("name", BY_NAME)
def test_greedy_generation_is_the_originals(name: str, use_cache: bool, glm_lm: LoadedModel) -> None:
    ids = ids_of(BY_NAME[name])
    out = glm_lm.model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=use_cache)
    assert out[0, ids.shape[1] :].tolist() == BY_NAME[name]["greedy_new_tokens"]


@pytest.mark.parametrize("name", BY_NAME)
def test_each_cached_step_gives_the_originals_logits(name: str, glm_lm: LoadedModel) -> None:
    """Prefill, then one token at a time through the cache, as the engine decodes."""
    case = BY_NAME[name]
    model, steps = glm_lm.model, TENSORS[f"{name}.greedy_step_logits"]  # [16, 1, V]
    with torch.no_grad():
        out = model(ids_of(case), use_cache=True, logits_to_keep=1)
        for step, token in enumerate(case["greedy_new_tokens"]):
            assert (out.logits[:, -1] - steps[step]).abs().max() < TOLERANCE, f"step {step}"
            out = model(torch.tensor([[token]]), cache=out.cache, use_cache=True)


def test_a_left_padded_batch_matches_the_original(glm_lm: LoadedModel) -> None:
    case = CASES["batched"]
    ids = torch.tensor(case["input_ids"])
    pad = glm_lm.model.config.pad_token_id
    real = (ids != pad).long()  # left padding: every real token comes after the padding
    with torch.no_grad():
        logits = glm_lm.model(ids, attention_mask=real).logits
    reference = torch.tensor(case["last_logits"])
    assert (logits[:, -1] - reference).abs().max() < TOLERANCE
    real_argmax = [
        [a for a, r in zip(row, mask, strict=True) if r]
        for row, mask in zip(logits.argmax(-1).tolist(), real.tolist(), strict=True)
    ]
    want = [
        [a for a, r in zip(row, mask, strict=True) if r]
        for row, mask in zip(case["argmax_per_position"], real.tolist(), strict=True)
    ]
    assert real_argmax == want
    out = glm_lm.model.generate(ids, attention_mask=real, max_new_tokens=16, do_sample=False)
    assert out[:, ids.shape[1] :].tolist() == case["greedy_new_tokens"]
    for row, alone in enumerate(case["unpadded_single_runs"]):  # and each row alone gives the same tokens
        single = torch.tensor(alone["input_ids"])
        assert (
            glm_lm.model.generate(single, max_new_tokens=16, do_sample=False)[0, single.shape[1] :].tolist()
            == (case["greedy_new_tokens"][row])
        )


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_rotary_tables_at_the_real_6b_width_are_the_originals(dtype: str) -> None:
    reference = load_file(GOLDEN / f"rotary_real_dims_{dtype}.safetensors")
    cos, sin = rotary_table(2048, 64, getattr(torch, dtype))
    assert cos.dtype == reference["cos"].dtype
    assert torch.equal(cos, reference["cos"]) and torch.equal(sin, reference["sin"])


def test_half_precision_stays_close_to_the_originals_half_precision() -> None:
    """A loose check of the fp16 path (CPU fp16 accumulates differently from the original's; golden README)."""
    case = CASES["fp16_informational"]
    model, _, _ = load(GOLDEN, "cpu", torch.float16, 16)
    with torch.no_grad():
        logits = model(torch.tensor(case["input_ids"])).logits.float()
    assert logits.dtype == torch.float32 and model.transformer.word_embeddings.weight.dtype == torch.float16
    assert (logits[0, -1] - torch.tensor(case["last_logits_fp16_model"])).abs().max() < 0.1
    agree = (logits[0].argmax(-1) == torch.tensor(case["argmax_per_position_fp16"])).float().mean()
    assert agree > 0.98


def test_scores_that_are_not_finite_force_the_space_token_like_the_original() -> None:
    table = golden("tokenizer_cases.json")["invalid_score_logits_processor"]
    for given, want in (("in_nan", "out_nan"), ("in_inf", "out_inf"), ("in_finite", "out_finite")):
        scores = torch.tensor([[float(v) for v in table[given]]])
        assert fix_invalid_scores(scores)[0].tolist() == table[want]
    # one bad row of a batch does not touch the others
    batch = torch.tensor([[0.5, float("nan"), 1.0, 2.0, 0.0, 3.0], [0.5, 1.0, 7.0, 2.0, 0.0, 3.0]])
    fixed = fix_invalid_scores(batch)
    assert fixed[0].argmax() == 5 and fixed[1].tolist() == batch[1].tolist()
