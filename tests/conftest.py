"""Fixtures: tiny random models built on the fly, apps over them, and live servers started through the CLI."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.config import ServerConfig
from engine import Engine, EngineConfig
from generation.prepare import load_model
from models.loader import LoadedModel, ModelConfig
from server import create_app

JSON = {"Content-Type": "application/json"}

ROOT = Path(__file__).resolve().parent.parent

# Enough text for a byte-level BPE to learn some merges; Chinese and emoji mostly stay split
# across byte tokens, which is what the streaming tests need.
CORPUS = [
    "Hello world, this is a tiny test model for the streaming chat server.",
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "你好，世界！今天天气很好。我们一起去公园散步吧。",
    "流式输出必须正确处理中文字符和表情符号 😀🚀🌍🎉",
    "def hello():\n    return 'world'\n",
    "Numbers: 1 2 3 4 5 6 7 8 9 10. Emoji: 👍👌🔥✨",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_CONTEXT = 256


def build_tiny_model(folder: Path, *, chat_template: bool = True, seed: int = 0, context: int = TINY_CONTEXT) -> Path:
    """A random 2-layer Llama and a trained byte-level BPE tokenizer, saved like any HF model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


# Hugging Face Llama parameter names and their GGUF names (llama.cpp's naming).
GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def build_tiny_gguf(folder: Path, quant: str | None = None) -> Path:
    """The tiny random model written as a `.gguf` file (gpt2-style BPE vocabulary): float32 tensors, or its matrices
    in a GGUF quantization type such as "Q4_1" or "Q8_0"."""
    import gguf
    from gguf import quants
    from safetensors.torch import load_file

    hf = build_tiny_model(folder / "hf")
    config = json.loads((hf / "config.json").read_text())
    tokenizer = json.loads((hf / "tokenizer.json").read_text())
    out = folder / f"tiny{'-' + quant if quant else ''}.gguf"
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    special = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    vocab = sorted({**tokenizer["model"]["vocab"], **special}.items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([token for token, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges([" ".join(m) for m in tokenizer["model"]["merges"]])
    w.add_eos_token_id(config["eos_token_id"])
    w.add_pad_token_id(config["pad_token_id"])
    w.add_chat_template(CHAT_TEMPLATE)
    kind = getattr(gguf.GGMLQuantizationType, quant) if quant else None
    for name, tensor in load_file(hf / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if module in GGUF_NAMES:
            gguf_name = f"{GGUF_NAMES[module]}.weight"
        else:  # model.layers.<i>.<module>.weight
            _, _, i, rest = module.split(".", 3)
            gguf_name = f"blk.{i}.{GGUF_LAYER_NAMES[rest]}.weight"
        data = tensor.float().numpy()
        if kind is not None and data.ndim == 2:
            packed = quants.quantize(data, kind)  # bytes [rows, blocks · block size]; GGUF derives the shape
            w.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=kind)
        else:
            w.add_tensor(gguf_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_dir: Path) -> LoadedModel:
    # float32: answers are the same alone and in a batch whatever CPU the tests run on
    return load_model(ModelConfig(path=tiny_dir, device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def glm_lm() -> LoadedModel:
    """ChatGLM-6B's tiny golden model in fp32, loaded natively from the golden directory."""
    from tests.glm import GOLDEN

    return load_model(ModelConfig(path=GOLDEN, device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def plain_lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny model whose tokenizer has no chat template (the fallback prompt format)."""
    folder = build_tiny_model(tmp_path_factory.mktemp("plain"), chat_template=False)
    return load_model(ModelConfig(path=folder, device="cpu", dtype="float32"))


class Wrapped(torch.nn.Module):
    """A model seen through a test's wrapper of its forward pass; the config (caches are made from it) is the
    model's."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.config = model.config


class Slow(Wrapped):
    """A model 20 ms slower per forward pass, so a long request surely outlasts a test's next steps."""

    def forward(self, **kwargs: Any) -> Any:
        time.sleep(0.02)
        return self.model(**kwargs)


@pytest.fixture(scope="session")
def slow_lm(tiny_lm: LoadedModel) -> LoadedModel:
    return dataclasses.replace(tiny_lm, model=Slow(tiny_lm.model), lean_decode=False)


MakeClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def make_client(aiohttp_client: Any, tiny_lm: LoadedModel) -> MakeClient:
    """An aiohttp test client over a fresh engine; keyword args go to ServerConfig/EngineConfig."""

    async def make(lm: LoadedModel | None = None, **kwargs: Any) -> TestClient[web.Request, web.Application]:
        engine_keys = set(EngineConfig.__dataclass_fields__)
        engine_config = EngineConfig(**{k: v for k, v in kwargs.items() if k in engine_keys})
        server_config = ServerConfig(**{k: v for k, v in kwargs.items() if k not in engine_keys})
        app = create_app(server_config, Engine(lm or tiny_lm, engine_config))
        client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
        return client

    return make


# ---- live servers through the real CLI -----------------------------------------------------------


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.load(r)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST", headers=JSON)
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)

    def get_status(self, path: str) -> tuple[int, Any]:
        """(status, JSON body), error statuses included."""
        return self._status(urllib.request.Request(self.url + path))

    def post_status(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        return self._status(
            urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST", headers=JSON)
        )

    @staticmethod
    def _status(req: urllib.request.Request) -> tuple[int, Any]:
        import urllib.error

        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.load(error)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    args: list[str], log: Path, timeout: float = 240.0, healthy: bool = True, port: int | None = None
) -> LiveServer:
    """`python server.py ARGS` on a free port (or `port`); returns once /health answers 200 (or at all, when not
    `healthy`)."""
    port = port or free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py"), "--port", str(port), *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited {process.returncode}: {log.read_text()[-3000:]}")
        try:
            if not healthy:
                server.get_status("/health")
                return server
            if server.get("/health")["status"] == "ok":
                return server
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise TimeoutError("server did not become healthy")


def stop_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def tiny_server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("logs") / "tiny_server.log"
    server = start_server(["--model", str(tiny_dir), "--served-model-name", "tiny", "--device", "cpu"], log)
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def tiny_upstream(tiny_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """This server with no model of its own, serving tiny_server's through --upstream under the name "up"."""
    args = ["--upstream", tiny_server.url + "/v1", "--served-model-name", "up"]
    with running_server(args, tmp_path_factory.mktemp("logs") / "tiny_upstream.log") as server:
        yield server


@pytest.fixture(scope="session")
def bundled_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled server's own GGUF cache: each session converts as a first start does; the user's stays untouched."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def bundled_fp32(bundled_server: LiveServer, bundled_cache: Path) -> LoadedModel:
    """The bundled model in float32 and 16 bits, loaded in-process (converted into the bundled server's cache)."""
    return load_model(ModelConfig(device="cpu", cache_dir=bundled_cache, dtype="float32", quantize=16))


@pytest.fixture(scope="session")
def bundled_server(bundled_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The bundled SmolLM2-135M, served as `python server.py` serves it (but with its own cache folder)."""
    args = ["--device", "cpu", "--cache-dir", str(bundled_cache)]
    server = start_server(args, tmp_path_factory.mktemp("logs") / "bundled_server.log")
    yield server
    stop_server(server)


# ---- processes a test starts itself: stopped whether the test passes or fails ------------------------------------


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below `pid`, read from /proc (nothing where there is no /proc)."""
    found: list[tuple[int, str]] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(kid) for kid in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
        for kid in kids:
            started = _start_time(kid)
            if started is not None:
                found += [(kid, started), *_descendants(kid)]
    return found


def _start_time(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat): tells it from a later process given the same id."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split())[19]
    except (OSError, IndexError):
        return None


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a process this test started, and whatever it started: SIGTERM, then SIGKILL after 20 s. Nothing to do for
    a process that already ended (a test that stopped it itself)."""
    import signal

    children = _descendants(process.pid) if process.poll() is None else []
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for pid, started in children:
        if _start_time(pid) == started:  # still that child, not a new process with its id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextlib.contextmanager
def running_server(args: list[str], log: Path, **kwargs: Any) -> Iterator[LiveServer]:
    """`start_server(args, log, ...)` for a `with` block: the server (and its children) stop when the block ends,
    an assertion that failed inside it included."""
    server = start_server(args, log, **kwargs)
    try:
        yield server
    finally:
        stop_process(server.process)
