"""Loading a ChatGLM-6B checkpoint directory as published: config, weights (optionally quantized on the way in, or
already quantized), tokenizer and chat format."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.chatglm.chatglm6b_chat import ChatGLM6BFormat
from models.chatglm.chatglm6b_config import ChatGLMConfig
from models.chatglm.chatglm6b_model import ChatGLMForCausalLM
from models.chatglm.chatglm6b_tokenizer import ChatGLMTokenizer, TokenizerError
from models.chatglm.checkpoint import CheckpointError, find_shards, log_progress, place, read_shard, unfilled
from models.packing import quantize_rows, unpack_int4
from models.quantize import QuantizedLinear, replace_with_empty

log = logging.getLogger(__name__)

VOCAB_FILE = "ice_text.model"
_INTS = (
    "vocab_size", "hidden_size", "inner_hidden_size", "num_layers", "num_attention_heads", "max_sequence_length",
    "bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id",
)  # fmt: skip
# the four linear layers of every block that the original quantizes (spec section 8)
QUANTIZED = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def read_config(folder: Path) -> ChatGLMConfig:
    """config.json as a ChatGLMConfig; CheckpointError naming the field when it is not ChatGLM-6B's."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc

    def bad(field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a ChatGLM-6B config: '{field}' {problem}")

    if not isinstance(raw, dict) or raw.get("model_type") != "chatglm":
        raise CheckpointError(f"{path}: not a ChatGLM-6B config: 'model_type' is not \"chatglm\"")
    for field in _INTS:
        value = raw.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(field, "must be a non-negative integer" if field in raw else "is missing")
    eps = raw.get("layernorm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise bad("layernorm_epsilon", "must be a positive number")
    if raw["hidden_size"] % raw["num_attention_heads"] or (raw["hidden_size"] // raw["num_attention_heads"]) % 4:
        raise bad("hidden_size", "must split into heads whose width is a multiple of 4 (two rotary halves)")
    if raw.get("position_encoding_2d", True) is not True:
        raise bad("position_encoding_2d", "must be true: no released ChatGLM-6B uses the 1D variant")
    if raw.get("quantization_bit") not in (None, 0, 4, 8):
        raise bad("quantization_bit", "must be 0, 4 or 8")
    if raw.get("pre_seq_len"):
        raise bad("pre_seq_len", "is set: P-tuning v2 prefixes are not supported; merge or drop the prefix encoder")
    fields = set(ChatGLMConfig.__dataclass_fields__)
    return ChatGLMConfig(**{k: v for k, v in raw.items() if k in fields and v is not None})


def read_tokenizer(folder: Path, config: ChatGLMConfig) -> ChatGLMTokenizer:
    """`ice_text.model` through sentencepiece, with the image-token offset of tokenizer_config.json."""
    vocab = folder / VOCAB_FILE
    if not vocab.is_file():
        raise CheckpointError(f"{vocab}: missing (ChatGLM-6B's SentencePiece vocabulary)")
    settings: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        try:
            settings = json.loads((folder / "tokenizer_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder / 'tokenizer_config.json'}: unreadable ({exc})") from exc
    try:
        plain = ChatGLMTokenizer(vocab)
        # the file's own setting, else the offset that puts `[gMASK]` where config.json says it is
        offset = settings.get("num_image_tokens", config.gmask_token_id - plain.gmask_token_id)
        tokenizer = plain if offset == 0 else ChatGLMTokenizer(vocab, int(offset))
    except (TokenizerError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"{vocab}: not a ChatGLM-6B vocabulary ({exc})") from exc
    ours = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id, tokenizer.gmask_token_id)
    theirs = (config.bos_token_id, config.eos_token_id, config.mask_token_id, config.gmask_token_id)
    if ours != theirs or tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{vocab}: does not fit config.json (special ids {list(ours)} vs {list(theirs)}, "
            f"{tokenizer.vocab_size} pieces for {config.vocab_size} embedding rows)"
        )
    return tokenizer


def build(config: ChatGLMConfig, bits: int) -> ChatGLMForCausalLM:
    """The model on the meta device (no memory), its quantized layers in place when bits is 8 or 4."""
    with torch.device("meta"):
        model = ChatGLMForCausalLM(config)
    if bits in (4, 8):
        names = [f"transformer.layers.{i}.{name}" for i in range(config.num_layers) for name in QUANTIZED]
        replace_with_empty(model, names, bits)
    return model


def load(folder: Path, device: str, dtype: torch.dtype, quantize: int) -> tuple[Any, ChatGLMTokenizer, ChatGLM6BFormat]:
    """(model, tokenizer, chat format) of a ChatGLM-6B directory; CheckpointError on any problem with it."""
    config = read_config(folder)
    tokenizer = read_tokenizer(folder, config)
    published = config.quantization_bit
    if published and quantize not in (16, published):
        raise CheckpointError(
            f"{folder / 'config.json'}: the weights are already {published}-bit; --quantize {quantize} cannot change"
            f" that (leave --quantize out, or point --model at the fp16 checkpoint)"
        )
    bits = published or (quantize if quantize in (4, 8) else 16)
    shards = find_shards(folder)
    model = build(config, bits)
    _fill(model, shards, device, dtype, prequantized=bool(published))
    model.lm_head.weight = model.transformer.word_embeddings.weight  # tied, as the original ties them at load
    missing = unfilled(model)
    if missing:
        names = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"{folder}: weights missing from every shard: {names}")
    model.requires_grad_(False).train(False)
    return model, tokenizer, ChatGLM6BFormat(tokenizer)


def _fill(model: ChatGLMForCausalLM, shards: list[Any], device: str, dtype: torch.dtype, prequantized: bool) -> None:
    """Read the shards one at a time into the meta model: convert, quantize, place, drop the source."""
    params = dict(model.named_parameters())
    pending: dict[str, dict[str, torch.Tensor]] = {}  # quantized layer → what arrived of weight/scale/bias
    for n, shard in enumerate(shards, 1):
        for key, tensor in read_shard(shard):
            if key.endswith("rotary_emb.inv_freq") or key == "lm_head.weight":
                continue  # recomputed (spec 3.5), and tied to the embeddings
            owner, _, name = key.rpartition(".")
            module = _submodule(model, owner)
            if isinstance(module, QuantizedLinear):
                parts = pending.setdefault(owner, {})
                parts.update(_quantized_parts(module, key, name, tensor.to(device), shard, prequantized))
                if {"q", "scale", "bias"} <= parts.keys():
                    module.set_weights(parts["q"], parts["scale"], parts["bias"], dtype, device)
                    del pending[owner]
                continue
            expected = params.get(key)
            if module is None or expected is None:
                raise CheckpointError(f"{shard.path}: unexpected weight {key} (not part of ChatGLM-6B)")
            if tuple(tensor.shape) != tuple(expected.shape):
                raise CheckpointError(
                    f"{shard.path}: {key} has shape {list(tensor.shape)}, config.json implies {list(expected.shape)}"
                )
            place(module, name, tensor.to(device=device, dtype=dtype, copy=True))
        log_progress(n, len(shards), shard.path)
    for owner, parts in pending.items():
        lacking = {"q": "weight", "scale": "weight_scale", "bias": "bias"}
        absent = [f"{owner}.{lacking[p]}" for p in lacking if p not in parts]
        raise CheckpointError(f"{shards[-1].path.parent}: weights missing from every shard: {', '.join(absent)}")


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _quantized_parts(
    module: QuantizedLinear, key: str, name: str, tensor: torch.Tensor, shard: Any, prequantized: bool
) -> dict[str, torch.Tensor]:
    """One checkpoint entry of a quantized layer as its parts (q, scale, bias), checked; an fp16 weight is
    quantized at once, so its copy is dropped before the next one is read."""
    out, width = module.out_features, module.in_features
    shapes = {"bias": (out,), "weight": (out, width)}
    if prequantized:
        shapes.update(weight_scale=(out,), weight=(out, width // 2) if module.bits == 4 else (out, width))
    if name not in shapes:
        raise CheckpointError(f"{shard.path}: unexpected weight {key} (not part of ChatGLM-6B)")
    if tuple(tensor.shape) != shapes[name]:
        raise CheckpointError(
            f"{shard.path}: {key} has shape {list(tensor.shape)}, config.json implies {list(shapes[name])}"
        )
    if name == "bias":
        return {"bias": tensor}
    if name == "weight_scale":
        return {"scale": tensor}
    if not prequantized:
        q, scale = quantize_rows(tensor, module.bits)
        return {"q": q, "scale": scale}
    if tensor.dtype != torch.int8:
        raise CheckpointError(f"{shard.path}: {key} is {tensor.dtype}; a quantized checkpoint stores int8")
    return {"q": unpack_int4(tensor) if module.bits == 4 else tensor}
