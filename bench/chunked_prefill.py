"""A long prompt prefilled in one piece against the engine's chunks, in one process on the bundled model at its
defaults: what each of the three things that keep chunks cheap is worth (unmasked attention to the cache, the
cache made once, the dequantized weights shared by the chunks), switched off one at a time, alternated twice.

    .venv/bin/python bench/chunked_prefill.py [--tokens 3781] [--chunk 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generation import batch  # noqa: E402
from generation.attention import FP32_SDPA, causal_mask  # noqa: E402
from generation.prepare import load_model  # noqa: E402
from generation.scheduler import chunk_size  # noqa: E402
from models.loader import LoadedModel, ModelConfig, bundled_model_path  # noqa: E402


def chunked(lm: LoadedModel, prompt: list[int], full: int, tell_more: bool) -> float:
    """Seconds to prefill `prompt` cut as the engine cuts it; `tell_more` False: each chunk as if it were the last
    (no cache made for the whole prompt, no shared dequantized weights)."""
    start, cache = time.perf_counter(), None
    with torch.inference_mode():
        done = 0
        while done < len(prompt):
            size = min(chunk_size(full, done, lm.attention_break_even), len(prompt) - done)
            more = len(prompt) - done - size if tell_more else 0
            _, cache = batch.prefill_chunk(lm, prompt[done : done + size], cache, more)
            done += size
    return time.perf_counter() - start


def one_piece(lm: LoadedModel, prompt: list[int]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        batch.prefill(lm, [prompt])
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=3781)
    p.add_argument("--chunk", type=int, default=512)
    args = p.parse_args()
    lm = load_model(ModelConfig(path=bundled_model_path()))
    prompt = [100 + (i * 7) % 20000 for i in range(args.tokens)]
    for _ in range(2):
        print(f"one piece: {one_piece(lm, prompt):.2f} s", flush=True)
        print(f"chunks: {chunked(lm, prompt, args.chunk, True):.2f} s", flush=True)
        print(f"chunks, each as if the last: {chunked(lm, prompt, args.chunk, False):.2f} s", flush=True)
        AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)  # a full mask for every chunk
        print(f"chunks with a masked attention: {chunked(lm, prompt, args.chunk, True):.2f} s", flush=True)
        AttentionMaskInterface.register(FP32_SDPA, causal_mask)


if __name__ == "__main__":
    main()
