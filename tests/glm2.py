"""Tiny ChatGLM2-6B, ChatGLM3-6B and GLM-4 checkpoints in their original (remote-code) layout, written by the tests:
random weights under the original key names and config fields, and small vocabularies trained here."""

from __future__ import annotations

import base64
import io
import itertools
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import regex
import sentencepiece as spm
import torch
from safetensors.torch import save_file

from models.chatglm.glm_tokenizer import GLM4_SPLIT

CORPUS = [
    "你好，世界！今天天气很好。我们一起去公园散步吧。",
    "Hello world, this is a tiny test model. What about tomorrow?",
    "[Round 1]\n\n问：你好\n\n答：你好，有什么可以帮你？\n\n",
    "流式输出必须正确处理中文字符和表情符号 😀🚀",
    "def hello():\n    return 'world'\n",
]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 16, 96, 2
REMOTE_CODE = {
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    },
}


def train_sentencepiece(
    folder: Path, keep_newlines: bool = False, extra_corpus: Sequence[str] = (), vocab_size: int = 400
) -> Path:
    """A tiny SentencePiece model like ChatGLM2's tokenizer.model (byte fallback, dummy prefix). `keep_newlines`:
    text is kept as it is (no NFKC, no squeezed whitespace), as the real ChatGLM3 tokenizer keeps the newlines of
    its tool calls. `extra_corpus`: more text to learn pieces from; `vocab_size`: how many pieces."""
    model = io.BytesIO()
    extra: dict[str, Any] = {}
    corpus = [*CORPUS, *extra_corpus]
    if keep_newlines:
        extra = {
            "normalization_rule_name": "identity",
            "remove_extra_whitespaces": False,
            "allow_whitespace_only_pieces": True,
        }
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 20),
        model_writer=model,
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        **extra,
    )
    path = folder / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def train_tiktoken(folder: Path, merges: int = 120, extra_corpus: Sequence[str] = ()) -> Path:
    """A tiny byte BPE vocabulary in GLM-4's `tokenizer.model` format: every byte, then the most frequent merges
    (learnt from the corpus and `extra_corpus`)."""
    words = [
        list(bytes([b]) for b in piece.encode())
        for text in [*CORPUS, *extra_corpus]
        for piece in regex.findall(GLM4_SPLIT, text)
    ]
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs = Counter((a, b) for word in words for a, b in itertools.pairwise(word))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for word in words:
            i = 0
            while i < len(word) - 1:
                if word[i] == a and word[i + 1] == b:
                    word[i : i + 2] = [a + b]
                i += 1
    path = folder / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()))
    return path


def original_config(kind: str, vocab: int) -> dict[str, Any]:
    config = {
        **REMOTE_CODE,
        "model_type": "chatglm",
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_residual_connection_post_layernorm": False,
        "ffn_hidden_size": FFN,
        "hidden_size": HIDDEN,
        "kv_channels": HEAD_DIM,
        "layernorm_epsilon": 1e-5,
        "multi_query_attention": True,
        "multi_query_group_num": KV_HEADS,
        "num_attention_heads": HEADS,
        "num_layers": LAYERS,
        "padded_vocab_size": vocab,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": 512,
        "torch_dtype": "float32",
        "eos_token_id": 2,
        "pad_token_id": 0,
        "_name_or_path": f"THUDM/{kind}",
    }
    if kind == "glm-4-9b-chat":
        config.update(rope_ratio=500, eos_token_id=[vocab - 32, vocab - 25, vocab - 23], pad_token_id=vocab - 32)
    return config


def original_weights(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the original key names, fused query/key/value rows included."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    weights = {"transformer.embedding.word_embeddings.weight": rand(vocab, HIDDEN, scale=0.5)}
    for i in range(LAYERS):
        p = f"transformer.encoder.layers.{i}."
        weights.update(
            {
                p + "input_layernorm.weight": 1 + rand(HIDDEN),
                p + "self_attention.query_key_value.weight": rand(qkv, HIDDEN),
                p + "self_attention.query_key_value.bias": rand(qkv),
                p + "self_attention.dense.weight": rand(HIDDEN, HEADS * HEAD_DIM),
                p + "post_attention_layernorm.weight": 1 + rand(HIDDEN),
                p + "mlp.dense_h_to_4h.weight": rand(2 * FFN, HIDDEN),
                p + "mlp.dense_4h_to_h.weight": rand(HIDDEN, FFN),
            }
        )
    weights["transformer.encoder.final_layernorm.weight"] = 1 + rand(HIDDEN)
    weights["transformer.output_layer.weight"] = rand(vocab, HIDDEN, scale=0.5)
    weights["transformer.rotary_pos_emb.inv_freq"] = torch.rand(HEAD_DIM // 4)  # present, never used
    return weights


def write_checkpoint(
    folder: Path,
    kind: str,
    keep_newlines: bool = False,
    extra_corpus: Sequence[str] = (),
    vocab_size: int = 400,
    merges: int = 120,
) -> Path:
    """chatglm2-6b / chatglm3-6b as `.bin` shards with their index, glm-4-9b-chat as safetensors shards.
    `keep_newlines`: the SentencePiece tokenizer keeps newlines and spaces (see `train_sentencepiece`);
    `extra_corpus`: more text the tokenizer learns from; `vocab_size`: the SentencePiece pieces; `merges`: GLM-4's
    merges."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "glm-4-9b-chat":
        ranks = train_tiktoken(folder, merges, extra_corpus)
        pieces = sum(1 for line in ranks.read_text().splitlines() if line)
        vocab = pieces + 32  # 14 special tokens after the ranks, padded to a multiple of 32 like 151552
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLM4Tokenizer"}))
    else:
        model_file = train_sentencepiece(folder, keep_newlines, extra_corpus, vocab_size)
        pieces = spm.SentencePieceProcessor(model_file=str(model_file)).vocab_size()
        vocab = pieces + 16
        hint = {"chatglm3-6b": {"added": ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]}}
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "ChatGLMTokenizer", **hint.get(kind, {})})
        )
    (folder / "config.json").write_text(json.dumps(original_config(kind, vocab), indent=1))
    weights = original_weights(vocab)
    keys = list(weights)
    safetensors = kind == "glm-4-9b-chat"
    names = [
        f"model-0000{i + 1}-of-00002.safetensors" if safetensors else f"pytorch_model-0000{i + 1}-of-00002.bin"
        for i in range(2)
    ]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: weights[k].contiguous() for k in keys[i::2]}
        (save_file(part, folder / name) if safetensors else torch.save(part, folder / name))
        weight_map.update(dict.fromkeys(part, name))
    index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def reference_model(folder: Path) -> Any:
    """A native GlmForCausalLM built straight from the checkpoint, mapped here independently of chatglm/v2.py."""
    from transformers import GlmConfig, GlmForCausalLM

    raw = json.loads((folder / "config.json").read_text())
    config = GlmConfig(
        vocab_size=raw["padded_vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["ffn_hidden_size"],
        num_hidden_layers=raw["num_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw["multi_query_group_num"],
        head_dim=raw["kv_channels"],
        max_position_embeddings=raw["seq_length"],
        rms_norm_eps=raw["layernorm_epsilon"],
        attention_bias=True,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * raw.get("rope_ratio", 1),
            "partial_rotary_factor": 0.5,
        },
        pad_token_id=0,
    )
    weights = original_weights(raw["padded_vocab_size"])
    state = {
        "model.embed_tokens.weight": weights["transformer.embedding.word_embeddings.weight"],
        "model.norm.weight": weights["transformer.encoder.final_layernorm.weight"],
        "lm_head.weight": weights["transformer.output_layer.weight"],
    }
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        old, new = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            fused = weights[old + f"self_attention.query_key_value.{kind}"]
            state[new + f"self_attn.q_proj.{kind}"] = fused[:q]
            state[new + f"self_attn.k_proj.{kind}"] = fused[q : q + kv]
            state[new + f"self_attn.v_proj.{kind}"] = fused[q + kv :]
        state[new + "self_attn.o_proj.weight"] = weights[old + "self_attention.dense.weight"]
        state[new + "mlp.gate_up_proj.weight"] = weights[old + "mlp.dense_h_to_4h.weight"]
        state[new + "mlp.down_proj.weight"] = weights[old + "mlp.dense_4h_to_h.weight"]
        state[new + "input_layernorm.weight"] = weights[old + "input_layernorm.weight"]
        state[new + "post_attention_layernorm.weight"] = weights[old + "post_attention_layernorm.weight"]
    model = GlmForCausalLM(config)
    model.load_state_dict(state, strict=True)
    return model.eval()
