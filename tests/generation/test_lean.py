"""Decode steps as plain functions (generation/lean.py): the logits of transformers' forward pass, for the models whose
layers have the Llama shape; other models keep transformers' path."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from generation.batch import KVBatch, decode_step, prefill
from generation.prepare import load_model
from models.loader import LoadedModel, ModelConfig


@pytest.mark.parametrize("short", [14, 3])  # the second row padded a little (the padded attention) or much (row by row)
# float32 at 4 bits: the kernels fed bf16 in a float32 model (an AVX2 CPU's default), their outputs promoted
@pytest.mark.parametrize(("dtype", "bits"), [("float32", 16), ("bfloat16", 16), ("bfloat16", 4), ("float32", 4)])
def test_plain_decode_steps_give_transformers_logits(dtype: str, bits: int, short: int, tiny_dir: Path) -> None:
    lm = load_model(ModelConfig(path=tiny_dir, device="cpu", dtype=dtype, quantize=bits))
    assert lm.lean_decode
    plain = dataclasses.replace(lm, lean_decode=False)
    prompts = [list(range(10, 30)), list(range(40, 40 + short))]
    batches = []
    with torch.inference_mode():
        for model in (lm, plain):
            logits, cache, mask = prefill(model, prompts)
            batch = KVBatch()
            batch.add(cache, mask)
            batches.append((model, batch, logits))
        tokens = [int(t) for t in batches[0][2].argmax(-1)]
        for _ in range(12):
            got, want = (decode_step(model, batch, tokens) for model, batch, _ in batches)
            assert torch.allclose(got, want, atol=1e-2 * float(want.abs().max()))
            tokens = [int(t) for t in want.argmax(-1)]
        batches[0][1].keep([1])  # one row left, no padding: the step without a mask
        batches[1][1].keep([1])
        got, want = (decode_step(model, batch, tokens[1:]) for model, batch, _ in batches)
        assert torch.allclose(got, want, atol=1e-2 * float(want.abs().max()))


def test_other_architectures_keep_transformers_path(glm_lm: LoadedModel) -> None:
    assert not glm_lm.lean_decode  # ChatGLM-6B: its own layers


def test_start_up_says_which_decode_path_it_takes(tiny_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.glm import GOLDEN

    with caplog.at_level(logging.INFO, logger="generation.prepare"):
        load_model(ModelConfig(path=tiny_dir, device="cpu", dtype="bfloat16"))
        assert "attention in float32, decode steps through plain functions (generation/lean.py)" in caplog.text
        caplog.clear()
        load_model(ModelConfig(path=GOLDEN, device="cpu", dtype="float32"))
        assert "attention in float32, decode steps through transformers" in caplog.text
