"""What the real ChatGLM models need in memory at 16, 8 and 4 bits, computed from their published shapes (no
weights needed): each model is built on the meta device with its released config's numbers, then every tensor is
counted in the format this server keeps it in.

    .venv/bin/python bench/chatglm_memory.py
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.chatglm.chatglm6b_config import ChatGLMConfig
from models.chatglm.chatglm6b_loader import QUANTIZED, build
from models.chatglm.glm_loader import native_config

GIB = 1 << 30
GROUP = 32  # int4 columns per (scale, zero) for every model but ChatGLM-6B
# the released configs of the original layouts (spec section 11.2)
GLM2 = {
    "hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32, "kv_channels": 128, "ffn_hidden_size": 13696,
    "padded_vocab_size": 65024, "multi_query_attention": True, "multi_query_group_num": 2, "add_qkv_bias": True,
    "seq_length": 8192,
}  # fmt: skip
GLM4 = {**GLM2, "num_layers": 40, "padded_vocab_size": 151552, "seq_length": 131072, "rope_ratio": 500}


def chatglm6b_bytes(bits: int) -> int:
    """ChatGLM-6B the original way: the four linear layers of each block per row (int4 tiles: a (scale, zero) per
    256 columns), everything else 16-bit."""
    config = ChatGLMConfig()
    model = build(config, 16)
    quantized = {f"transformer.layers.{i}.{layer}.weight" for i in range(config.num_layers) for layer in QUANTIZED}
    total = 0
    for name, tensor in model.named_parameters():  # lm_head shares the embedding: counted once
        if bits == 16 or name not in quantized:
            total += tensor.numel() * 2
        elif bits == 8:
            total += tensor.numel() + tensor.shape[0] * 2
        else:
            total += tensor.numel() // 2 + tensor.shape[0] * (tensor.shape[1] // 256) * 4
    return total


def glm_bytes(model: Any, bits: int) -> int:
    """Every other model: linear layers as int8 rows or int4 groups of 32, the LM head int8, embeddings int8 rows."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    total = 0
    for module in model.modules():
        for tensor in module.parameters(recurse=False):
            if bits == 16 or tensor.dim() == 1:
                total += tensor.numel() * 2  # norms and biases stay 16-bit
            elif isinstance(module, nn.Linear) and (bits == 8 or module is head):
                total += tensor.numel() + tensor.shape[0] * 2
            elif isinstance(module, nn.Linear):
                total += tensor.numel() // 2 + tensor.numel() // GROUP * 4
            elif module is embeddings:
                total += tensor.numel() + tensor.shape[0] * 2
    return total


def main() -> None:
    from transformers import GlmForCausalLM

    rows: list[tuple[str, int, int, Callable[[int], int]]] = []
    config6b = ChatGLMConfig()
    kv6b = 2 * config6b.num_layers * config6b.hidden_size * 2
    rows.append(("ChatGLM-6B", sum(t.numel() for t in build(config6b, 16).parameters()), kv6b, chatglm6b_bytes))
    for name, raw in (("ChatGLM2-6B / ChatGLM3-6B", GLM2), ("GLM-4-9B-chat", GLM4)):
        config = native_config(raw)
        with torch.device("meta"):
            model = GlmForCausalLM(config)
        kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
        rows.append((name, sum(t.numel() for t in model.parameters()), kv, functools.partial(glm_bytes, model)))
    for name, params, kv, size in rows:
        print(f"{name}: {params:,} parameters; KV cache {kv:,} bytes per token (16-bit)")
        for bits in (16, 8, 4):
            weights = size(bits)
            print(f"  --quantize {bits:2d}: weights {weights:,} bytes = {weights / GIB:.2f} GiB")


if __name__ == "__main__":
    main()
