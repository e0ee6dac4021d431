"""ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat in their original (remote-code) layout, mapped at load time onto
transformers' native `GlmForCausalLM` (spec section 11): the config fields renamed, the fused query/key/value rows
split, GLM-4's `rope_ratio` turned into the rope base. Shards are streamed into a model built without memory."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from models.chatglm.checkpoint import CheckpointError, Shard, find_shards, log_progress, place, read_shard, unfilled
from models.chatglm.glm_chat import RolesFormat, RoundsFormat
from models.chatglm.glm_tokenizer import SentencePieceTokenizer, TiktokenTokenizer, TokenizerFileError, is_tiktoken_file

log = logging.getLogger(__name__)

CHATGLM2, CHATGLM3, GLM4 = "ChatGLM2-6B", "ChatGLM3-6B", "GLM-4"
STOPS = {CHATGLM2: (), CHATGLM3: ("<|user|>", "<|observation|>"), GLM4: ("<|user|>", "<|observation|>")}
_REQUIRED = ("hidden_size", "num_layers", "num_attention_heads", "kv_channels", "ffn_hidden_size", "padded_vocab_size")


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of an original ChatGLM2/3 or GLM-4 checkpoint, checked: CheckpointError names what is wrong."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc
    for field in _REQUIRED:
        value = raw.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            problem = "must be a positive integer" if field in raw else "is missing"
            raise CheckpointError(f"{path}: not a ChatGLM2/3 or GLM-4 config: '{field}' {problem}")
    if raw.get("multi_query_attention") and not isinstance(raw.get("multi_query_group_num"), int):
        raise CheckpointError(f"{path}: 'multi_query_group_num' is missing (multi_query_attention is set)")
    for field, want in (("rmsnorm", True), ("add_bias_linear", False), ("post_layer_norm", True)):
        if raw.get(field, want) != want:
            raise CheckpointError(f"{path}: '{field}' is {raw[field]!r}; the ChatGLM2/3 and GLM-4 layout has {want}")
    if raw.get("apply_residual_connection_post_layernorm", False):
        raise CheckpointError(f"{path}: 'apply_residual_connection_post_layernorm' is set; this layout has it off")
    if raw.get("pre_seq_len"):
        raise CheckpointError(f"{path}: 'pre_seq_len' is set: P-tuning prefixes are not supported")
    return dict(raw)


def native_config(raw: dict[str, Any]) -> Any:
    """The same model as transformers' GlmConfig (spec 11.2); rope base = 10000 · rope_ratio (GLM-4: 5,000,000)."""
    from transformers import GlmConfig

    heads = raw["num_attention_heads"]
    eos = raw.get("eos_token_id", 2)
    return GlmConfig(
        vocab_size=raw["padded_vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["ffn_hidden_size"],
        num_hidden_layers=raw["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw["multi_query_group_num"] if raw.get("multi_query_attention") else heads,
        head_dim=raw["kv_channels"],
        hidden_act="silu",
        max_position_embeddings=raw.get("seq_length", 2048),
        rms_norm_eps=raw.get("layernorm_epsilon", 1e-5),
        attention_bias=bool(raw.get("add_qkv_bias", False)),
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * float(raw.get("rope_ratio", 1)),
            "partial_rotary_factor": 0.5,
        },
        eos_token_id=eos if isinstance(eos, list) else [eos],
        pad_token_id=raw.get("pad_token_id", 0),
    )


def variant(folder: Path, raw: dict[str, Any]) -> str:
    """Which of the three a directory holds: GLM-4 ships a tiktoken vocabulary; ChatGLM3 knows role tokens."""
    vocab = folder / "tokenizer.model"
    if not vocab.is_file():
        raise CheckpointError(f"{vocab}: missing (the checkpoint's tokenizer)")
    if is_tiktoken_file(vocab):
        return GLM4
    hints = json.dumps(raw.get("_name_or_path", "")).lower()
    if (folder / "tokenizer_config.json").is_file():
        hints += (folder / "tokenizer_config.json").read_text().lower()
    return CHATGLM3 if "chatglm3" in hints or "<|user|>" in hints else CHATGLM2


def native_weights(key: str, tensor: torch.Tensor, config: Any) -> list[tuple[str, torch.Tensor]] | None:
    """The native keys and tensors of one original entry (spec 11.3); [] to drop it, None if unknown."""
    if key.endswith("rotary_pos_emb.inv_freq"):
        return []
    simple = {
        "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "transformer.encoder.final_layernorm.weight": "model.norm.weight",
        "transformer.output_layer.weight": "lm_head.weight",
    }
    if key in simple:
        return [(simple[key], tensor)]
    if not key.startswith("transformer.encoder.layers."):
        return None
    index, _, rest = key.removeprefix("transformer.encoder.layers.").partition(".")
    prefix = f"model.layers.{index}."
    renamed = {
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": "post_attention_layernorm.weight",
        "self_attention.dense.weight": "self_attn.o_proj.weight",
        "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
        "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
    }
    if rest in renamed:
        return [(prefix + renamed[rest], tensor)]
    if rest.startswith("self_attention.query_key_value."):
        kind = rest.rpartition(".")[2]  # weight or bias
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        if tensor.shape[0] != q + 2 * kv:
            raise ValueError(f"has {tensor.shape[0]} rows; the config implies {q} + 2·{kv}")
        parts = torch.split(tensor, [q, kv, kv])
        return [(f"{prefix}self_attn.{name}_proj.{kind}", part) for name, part in zip("qkv", parts, strict=True)]
    return None


def load(folder: Path, device: str, dtype: torch.dtype, save_native: Path | None = None) -> tuple[Any, Any, Any, str]:
    """(model, tokenizer, chat format, variant) of an original ChatGLM2/3 or GLM-4 directory."""
    from transformers import GlmForCausalLM
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    raw = read_config(folder)
    kind = variant(folder, raw)
    config = native_config(raw)
    try:
        if kind == GLM4:
            tokenizer: Any = TiktokenTokenizer(folder / "tokenizer.model")
        else:
            tokenizer = SentencePieceTokenizer(folder / "tokenizer.model", roles=kind == CHATGLM3)
    except TokenizerFileError as exc:
        raise CheckpointError(str(exc)) from exc
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{folder / 'tokenizer.model'}: {tokenizer.vocab_size} tokens for {config.vocab_size} embedding rows"
        )
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    _fill(model, find_shards(folder), config, device, dtype)
    with torch.device(device):  # computed, not stored: the meta model has none
        model.model.rotary_emb = GlmRotaryEmbedding(config)
    missing = unfilled(model)
    if missing:
        names = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"{folder}: weights missing from every shard: {names}")
    model.requires_grad_(False).train(False)
    if save_native is not None:
        save(model, folder, save_native)
    chat = RolesFormat(tokenizer, "<sop>" if kind == GLM4 else "sop") if kind != CHATGLM2 else RoundsFormat(tokenizer)
    return model, tokenizer, chat, kind


def _fill(model: Any, shards: list[Shard], config: Any, device: str, dtype: torch.dtype) -> None:
    params = dict(model.named_parameters())
    for n, shard in enumerate(shards, 1):
        for key, tensor in read_shard(shard):
            try:
                mapped = native_weights(key, tensor, config)
            except ValueError as exc:
                raise CheckpointError(f"{shard.path}: {key} {exc}") from exc
            if mapped is None:
                raise CheckpointError(f"{shard.path}: unexpected weight {key} (not part of ChatGLM2/3 or GLM-4)")
            for name, value in mapped:
                expected = params.get(name)
                if expected is None:  # say, a query/key/value bias where config.json has add_qkv_bias off
                    raise CheckpointError(f"{shard.path}: {key} does not fit config.json (no {name} in the model)")
                if tuple(value.shape) != tuple(expected.shape):
                    raise CheckpointError(
                        f"{shard.path}: {key} has shape {list(value.shape)}, config.json implies {list(expected.shape)}"
                    )
                owner, _, leaf = name.rpartition(".")
                place(model.get_submodule(owner), leaf, value.to(device=device, dtype=dtype, copy=True))
        log_progress(n, len(shards), shard.path)


def save(model: Any, source: Path, target: Path) -> None:
    """The mapped model in transformers' native layout (config.json, safetensors), with the original tokenizer files
    beside it: `AutoModelForCausalLM.from_pretrained(target)` loads it, and so do other engines that read GLM."""
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    for name in ("tokenizer.model", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    log.info("wrote the native layout to %s", target)
