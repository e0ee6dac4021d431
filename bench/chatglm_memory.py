"""What the real ChatGLM-6B needs in memory at 16, 8 and 4 bits, computed from its published shapes (no weights
needed): the model is built on the meta device with the released config.json's numbers, then every tensor is
counted in the format this server keeps it in.

    .venv/bin/python bench/chatglm_memory.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatglm.config import ChatGLMConfig
from chatglm.v1 import QUANTIZED, build

GIB = 1 << 30


def weight_bytes(bits: int, int4_group: int = 256) -> int:
    """Bytes of weights: 16-bit tensors, quantized layers as int8 [out, in] + a 16-bit scale per row, or as packed
    int4 [out, in/2] + a 16-bit (scale, zero) per row and group of `int4_group` columns (the tile kernels' format)."""
    config = ChatGLMConfig()  # the released checkpoint's numbers
    model = build(config, 16)
    quantized = {f"{name}.weight" for i in range(config.num_layers) for name in
                 (f"transformer.layers.{i}.{layer}" for layer in QUANTIZED)}  # fmt: skip
    total = 0
    for name, tensor in model.named_parameters():  # lm_head shares the embedding: counted once
        if bits == 16 or name not in quantized:
            total += tensor.numel() * 2
        elif bits == 8:
            total += tensor.numel() + tensor.shape[0] * 2
        else:
            total += tensor.numel() // 2 + tensor.shape[0] * (tensor.shape[1] // int4_group) * 2 * 2
    return total


def main() -> None:
    config = ChatGLMConfig()
    kv_per_token = 2 * config.num_layers * config.hidden_size * 2  # keys and values, 16-bit
    params = sum(t.numel() for t in build(config, 16).parameters())
    print(f"ChatGLM-6B: {params:,} parameters; KV cache {kv_per_token:,} bytes per token (16-bit)")
    for bits in (16, 8, 4):
        size = weight_bytes(bits)
        print(f"--quantize {bits:2d}: weights {size:,} bytes = {size / GIB:.2f} GiB")
    full = kv_per_token * config.max_sequence_length
    print(f"one request at the full {config.max_sequence_length}-token context: {full / GIB:.2f} GiB of KV cache")


if __name__ == "__main__":
    main()
