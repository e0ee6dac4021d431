"""ChatGLM2-6B, ChatGLM3-6B and GLM-4 served natively from their original layout, mapped onto transformers'
GlmForCausalLM; GLM in transformers' own layouts keeps loading through the generic path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from generation.prepare import load_model
from models.chat_format import Message
from models.chatglm.glm_tokenizer import SentencePieceTokenizer, TiktokenTokenizer
from models.loader import LoadedModel, ModelConfig
from tests.conftest import MakeClient
from tests.glm2 import reference_model, write_checkpoint
from tests.helpers import delta_frames
from tests.server.test_cli import run_cli

KINDS = ["chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {kind: write_checkpoint(tmp_path_factory.mktemp(kind), kind) for kind in KINDS}


@pytest.fixture(scope="module")
def served(checkpoints: dict[str, Path]) -> dict[str, LoadedModel]:
    return {kind: load_model(ModelConfig(path=p, device="cpu", dtype="float32")) for kind, p in checkpoints.items()}


IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 150, 12]])


@pytest.mark.parametrize("kind", KINDS)
def test_the_mapped_model_equals_a_native_glm_built_from_the_same_weights(
    kind: str, checkpoints: dict[str, Path], served: dict[str, LoadedModel]
) -> None:
    ours = served[kind].model
    assert type(ours).__name__ == "GlmForCausalLM"
    with torch.no_grad():
        assert torch.allclose(ours(IDS).logits, reference_model(checkpoints[kind])(IDS).logits, atol=1e-5)


def test_glm4s_rope_ratio_sets_the_rope_base(checkpoints: dict[str, Path], served: dict[str, LoadedModel]) -> None:
    model = served["glm-4-9b-chat"].model
    assert model.config.rope_parameters["rope_theta"] == 5_000_000.0
    reference = reference_model(checkpoints["glm-4-9b-chat"])
    with torch.no_grad():
        want = reference(IDS).logits
        reference.config.rope_parameters["rope_theta"] = 10000.0  # the default base: a different model
        from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

        reference.model.rotary_emb = GlmRotaryEmbedding(reference.config)
        wrong = reference(IDS).logits
        got = model(IDS).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, wrong, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
async def test_greedy_answers_stream_through_both_apis(
    kind: str, served: dict[str, LoadedModel], make_client: MakeClient
) -> None:
    client = await make_client(served[kind])
    body = {"query": "你好", "temperature": 0, "max_tokens": 12, "ignore_eos": True}
    frames = delta_frames(await (await client.post("/stream", json=body)).read())
    assert "".join(f["delta"] for f in frames) == frames[-1]["response"] and frames[-1]["finished"]
    messages = [{"role": "user", "content": "你好"}]
    answer = await (
        await client.post(
            "/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 12, "ignore_eos": True}
        )
    ).json()
    assert answer["choices"][0]["message"]["content"] == frames[-1]["response"]
    assert answer["usage"]["completion_tokens"] == 12


def test_chatglm2_prompts_are_rounds_after_gmask_sop(served: dict[str, LoadedModel]) -> None:
    lm = served["chatglm2-6b"]
    tok: SentencePieceTokenizer = lm.tokenizer
    # the published ids put [gMASK] and sop right after the 64789 pieces: +1 and +3
    assert (tok.special["[gMASK]"] - tok.pieces, tok.special["sop"] - tok.pieces) == (1, 3)
    messages = [Message("user", "你好"), Message("assistant", "你好！"), Message("user", "再见")]
    prompt = "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：再见\n\n答："
    assert lm.chat.encode(messages) == [tok.special["[gMASK]"], tok.special["sop"], *tok.encode(prompt)]
    assert lm.eos_token_ids == {2}


def test_chatglm3_prompts_use_role_tokens(served: dict[str, LoadedModel]) -> None:
    lm = served["chatglm3-6b"]
    tok: SentencePieceTokenizer = lm.tokenizer
    s = tok.special
    # published: [gMASK] 64790, sop 64792, <|user|> 64795, <|assistant|> 64796 after 64789 pieces
    assert [s[k] - tok.pieces for k in ("[gMASK]", "sop", "<|user|>", "<|assistant|>")] == [1, 3, 6, 7]
    ids = lm.chat.encode([Message("system", "简短"), Message("user", "你好")])
    newline = tok.encode("\n")
    assert ids == [
        s["[gMASK]"],
        s["sop"],
        s["<|system|>"],
        *newline,
        *tok.encode("简短"),
        s["<|user|>"],
        *newline,
        *tok.encode("你好"),
        s["<|assistant|>"],
    ]
    assert lm.eos_token_ids == {2, s["<|user|>"], s["<|observation|>"]}


def test_glm4_prompts_use_role_tokens_and_its_byte_bpe(served: dict[str, LoadedModel]) -> None:
    lm = served["glm-4-9b-chat"]
    tok: TiktokenTokenizer = lm.tokenizer
    s = tok.special
    # published: <|endoftext|> 151329, [gMASK] 151331, <sop> 151333, <|user|> 151336, <|assistant|> 151337
    assert [s[k] - tok.pieces for k in ("<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>")] == [
        0,
        2,
        4,
        7,
        8,
    ]
    assert tok.encode("\n") == [ord("\n")]  # a byte's own rank, as 198 is in the real vocabulary's order
    ids = lm.chat.encode([Message("user", "你好 😀")])
    assert ids == [s["[gMASK]"], s["<sop>"], s["<|user|>"], ord("\n"), *tok.encode("你好 😀"), s["<|assistant|>"]]
    assert tok.decode(tok.encode("你好 😀")) == "你好 😀"
    assert lm.eos_token_ids == {s["<|endoftext|>"], s["<|user|>"], s["<|observation|>"]}


def test_save_native_writes_what_transformers_loads(
    checkpoints: dict[str, Path], served: dict[str, LoadedModel], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "native"
    result = run_cli("--model", str(checkpoints["glm-4-9b-chat"]), "--save-native", str(out), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    native = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        assert torch.allclose(native(IDS).logits, served["glm-4-9b-chat"].model(IDS).logits, atol=1e-5)
    assert (out / "tokenizer.model").is_file()


def damaged(folder: Path, change: dict[str, Any] | None = None, drop: str | None = None) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(change or {})
    if drop:
        del config[drop]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("harm", "message"),
    [
        (lambda f: damaged(f, drop="kv_channels"), "'kv_channels' is missing"),
        (
            lambda f: damaged(f, {"ffn_hidden_size": 80}),
            "mlp.dense_h_to_4h.weight has shape [192, 64], config.json implies [160, 64]",
        ),
        (lambda f: (f / "tokenizer.model").write_bytes(b"\x00garbage"), "tokenizer.model: not a SentencePiece model"),
        (lambda f: damaged(f, {"padded_vocab_size": 100}), "tokens for 100 embedding rows"),
    ],
    ids=["missing-field", "shape", "tokenizer-kind", "vocab"],
)
def test_an_inconsistent_checkpoint_is_one_line_and_exit_status_2(harm: Any, message: str, tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "model", "chatglm2-6b")
    harm(folder)
    result = run_cli("--model", str(folder), "--device", "cpu", "--port", "0")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in result.stderr


@pytest.mark.parametrize("arch", ["GlmForCausalLM", "Glm4ForCausalLM"])
async def test_glm_in_transformers_layout_loads_through_the_generic_path(
    arch: str, tmp_path: Path, make_client: MakeClient
) -> None:
    import transformers

    from tests.conftest import CHAT_TEMPLATE, build_tiny_model

    tiny = build_tiny_model(tmp_path / "tok")  # only for its trained tokenizer
    config_class = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_class(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    getattr(transformers, arch)(config).save_pretrained(tmp_path / "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "model")
    lm = load_model(ModelConfig(path=tmp_path / "model", device="cpu", dtype="float32"))
    assert type(lm.model).__name__ == arch
    client = await make_client(lm)
    body = await (await client.post("/chat", json={"query": "hi", "max_tokens": 5, "ignore_eos": True})).json()
    assert body["usage"]["completion_tokens"] == 5
