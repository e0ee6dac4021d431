"""Decode speed of ChatGLM-6B-sized blocks on this machine at --quantize 16, 8 and 4, without the real weights.

Builds the model with the released config's widths (hidden 4096, MLP 16384, 32 heads, vocabulary 130528) but only
`--layers` blocks of random weights, quantizes them the way the loader does, and times one-token decode steps
after a short prompt. Per-block time times 28 plus the head estimates the real model's step.

    .venv/bin/python bench/chatglm_speed.py --layers 4 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.chatglm.chatglm6b_config import ChatGLMConfig
from models.chatglm.chatglm6b_loader import QUANTIZED, build
from models.chatglm.chatglm6b_model import ChatGLMForCausalLM
from models.packing import quantize_rows


def model_with(bits: int, layers: int, dtype: torch.dtype) -> Any:
    config = ChatGLMConfig(num_layers=layers)
    model: Any = ChatGLMForCausalLM(config)  # nn.Linear's own random init
    model = model.to(dtype)
    if bits == 16:
        return model.requires_grad_(False)
    quantized = build(config, bits)
    for name, module in quantized.named_modules():
        if any(name.endswith(layer) for layer in QUANTIZED):
            source = model.get_submodule(name)
            q, scale = quantize_rows(source.weight.data, bits)
            module.set_weights(q, scale, source.bias.data, dtype, "cpu")
    for name, tensor in model.state_dict().items():  # everything else as it is
        owner, _, leaf = name.rpartition(".")
        target = quantized.get_submodule(owner)
        placeholder = target._parameters.get(leaf)
        if placeholder is not None and placeholder.device.type == "meta":
            target._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    quantized.lm_head.weight = quantized.transformer.word_embeddings.weight
    return quantized


def step_ms(model: Any, steps: int) -> float:
    ids = torch.tensor([[5, 6, 7, 8, 130001, 130004]])
    with torch.inference_mode():
        out = model(ids, use_cache=True, logits_to_keep=1)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(torch.tensor([[int(out.logits[0, -1].argmax())]]), cache=out.cache, use_cache=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{args.layers} ChatGLM-6B blocks + head, {args.dtype}, {torch.get_num_threads()} threads")
    head = step_ms(model_with(16, 0, dtype), args.steps)  # embedding, final norm and LM head alone
    for bits in (16, 8, 4):
        total = step_ms(model_with(bits, args.layers, dtype), args.steps)
        per_block = (total - head) / args.layers
        print(
            f"--quantize {bits:2d}: {total:7.1f} ms per step; {per_block:6.2f} ms per block;"
            f" 28 blocks + head ≈ {28 * per_block + head:7.1f} ms"
        )
    print(f"embedding + final norm + head alone: {head:.1f} ms")


if __name__ == "__main__":
    main()
