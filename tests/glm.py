"""ChatGLM-6B test material: the golden reference data and checkpoints written from its weights in the layouts
the original was published in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from models.packing import pack_int4, quantize_rows

# Reference outputs of the original ChatGLM-6B code on a tiny random configuration (see its README.md).
GOLDEN = Path(__file__).resolve().parent / "golden" / "chatglm6b-tiny"
QUANTIZED = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
# what the published config.json holds beyond the model's numbers: the remote code we never run
REMOTE_CODE = {
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    },
}


def golden(name: str) -> Any:
    return json.loads((GOLDEN / name).read_text())


def golden_weights() -> dict[str, torch.Tensor]:
    """The tiny model's weights under the original key names (lm_head and the unused inv_freq buffers included)."""
    return load_file(GOLDEN / "model.safetensors")


def write_config(folder: Path, **changes: Any) -> None:
    config = {**golden("config.json"), **REMOTE_CODE, **changes}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_bin_checkpoint(folder: Path, weights: dict[str, torch.Tensor] | None = None, shards: int = 3) -> Path:
    """The official layout: `pytorch_model-0000N-of-0000M.bin` shards, their index, ice_text.model, configs."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = golden_weights() if weights is None else weights
    keys = list(weights)
    names = [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
    weight_map: dict[str, str] = {}
    for i, name in enumerate(names):
        part = {k: weights[k].clone() for k in keys[i::shards]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({**index, "weight_map": weight_map}, indent=2))
    shutil.copy(GOLDEN / "ice_text.model", folder / "ice_text.model")
    tokenizer_config = {"num_image_tokens": 0, "padding_side": "left", "tokenizer_class": "ChatGLMTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    write_config(folder)
    return folder


def quantized_weights(bits: int) -> dict[str, torch.Tensor]:
    """The golden weights in the layout of a checkpoint published quantized (`quantization_bit` 8 or 4)."""
    weights = golden_weights()
    for key in list(weights):
        if any(f".{name}.weight" in key for name in QUANTIZED):
            q, scale = quantize_rows(weights[key], bits)
            weights[key] = pack_int4(q) if bits == 4 else q
            weights[key.removesuffix("weight") + "weight_scale"] = scale
    return weights
