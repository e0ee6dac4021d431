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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatglm.config import ChatGLMConfig
from chatglm.model import ChatGLMForCausalLM
from chatglm.quantize import quantize_rows
from chatglm.v1 import QUANTIZED, build


def model_with(bits: int, layers: int, dtype: torch.dtype) -> ChatGLMForCausalLM:
    config = ChatGLMConfig(num_layers=layers)
    model = ChatGLMForCausalLM(config).to(dtype)  # nn.Linear's own random init
    if bits == 16:
        return model.eval()
    quantized = build(config, bits)
    for name, module in quantized.named_modules():
        if any(name.endswith(layer) for layer in QUANTIZED):
            source = model.get_submodule(name)
            q, scale = quantize_rows(source.weight.data, bits)
            module.set_weights(q, scale, source.bias.data, dtype, "cpu")
    for name, tensor in model.state_dict().items():  # everything else as it is
        owner, _, leaf = name.rpartition(".")
        target = quantized.get_submodule(owner)
        if leaf in target._parameters and target._parameters[leaf] is not None:
            if target._parameters[leaf].device.type == "meta":
                target._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    quantized.lm_head.weight = quantized.transformer.word_embeddings.weight
    return quantized.eval()


def step_ms(model: ChatGLMForCausalLM, steps: int) -> float:
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
    results = {}
    for bits in (16, 8, 4):
        model = model_with(bits, args.layers, dtype)
        results[bits] = step_ms(model, args.steps)
        head = model_with(bits, 0, dtype) if bits == 16 else None
        if head is not None:
            results["head"] = step_ms(head, args.steps)
        del model
    for bits in (16, 8, 4):
        per_block = (results[bits] - results["head"]) / args.layers
        print(
            f"--quantize {bits:2d}: {results[bits]:7.1f} ms per step; {per_block:6.2f} ms per block;"
            f" 28 blocks + head ≈ {28 * per_block + results['head']:7.1f} ms"
        )
    print(f"embedding + final norm + head alone: {results['head']:.1f} ms")


if __name__ == "__main__":
    main()
