"""transformers' decode step against the plain one of `lean.py` on the bundled model at its defaults: one row, 100
cached tokens, alternated in one process, and the largest logit difference between the two.

    .venv/bin/python bench/lean_decode.py
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import batch  # noqa: E402
from loader import LoadedModel, ModelConfig, bundled_model_path, load_model  # noqa: E402


def step_ms(lm: LoadedModel, prompt: list[int], steps: int = 50) -> tuple[float, torch.Tensor]:
    """Milliseconds a decode step after `prompt`, and the first step's logits."""
    with torch.inference_mode():
        _, cache = batch.prefill_chunk(lm, prompt, None)
        kv = batch.KVBatch()
        kv.add(cache, torch.ones(1, len(prompt), dtype=torch.long))
        first = batch.decode_step(lm, kv, [5])
        for _ in range(4):
            batch.decode_step(lm, kv, [5])
        start = time.perf_counter()
        for _ in range(steps):
            batch.decode_step(lm, kv, [5])
    return (time.perf_counter() - start) / steps * 1000, first


def main() -> None:
    plain = load_model(ModelConfig(path=bundled_model_path()))
    assert plain.lean_decode, "the bundled model should take the plain step"
    hf = dataclasses.replace(plain, lean_decode=False)
    prompt = list(range(100, 200))
    for _ in range(2):
        (hf_ms, want), (plain_ms, got) = step_ms(hf, prompt), step_ms(plain, prompt)
        print(f"decode step: transformers {hf_ms:.2f} ms, plain functions {plain_ms:.2f} ms", flush=True)
    print(f"largest logit difference: {float((got - want).abs().max())}")


if __name__ == "__main__":
    main()
