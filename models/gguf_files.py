"""GGUF files: the weight width a file stores, and its converted copy kept in the cache folder (transformers parses
GGUF slowly; the copy loads in seconds)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LEVELS_FILE = "gguf_levels.json"  # in a converted copy: the bits the GGUF file stores its weights in


def gguf_cache_entry(path: Path, cache_dir: Path, dtype: Any) -> Path:
    """The cache folder for one GGUF file converted to `dtype`: a new file, a changed file, another dtype or a new
    transformers gets a new one."""
    import transformers

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{dtype}"
    return cache_dir / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def gguf_bits(path: Path) -> int:
    """The bits a GGUF file stores most of its weights in: 4 for Q4/Q5 and the 4-bit IQ types (int4 measures
    faster than int8 here at one stream), 8 for Q6/Q8, 16 for float files."""
    import gguf

    sizes: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        sizes[tensor.tensor_type.name] = sizes.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
    kind = max(sizes, key=lambda k: sizes[k]) if sizes else "F32"
    if kind.startswith(("Q4", "Q5", "IQ4", "Q3", "Q2", "IQ3", "IQ2", "IQ1")):
        return 4
    if kind.startswith(("Q6", "Q8")):
        return 8
    return 16


def own_bits(path: Path, cached: Path | None) -> int:
    """A checkpoint's own weight bits: a GGUF file's level (remembered in its converted copy), else 16."""
    if not path.is_file():
        return 16
    if cached is not None and (cached / LEVELS_FILE).is_file():
        try:
            return int(json.loads((cached / LEVELS_FILE).read_text())["bits"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return gguf_bits(path)


def save_converted(model: Any, tokenizer: Any, entry: Path, bits: int) -> None:
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
        (partial / LEVELS_FILE).write_text(json.dumps({"bits": bits}))
        if entry.exists():  # the copy that failed to load
            shutil.rmtree(entry)
        os.replace(partial, entry)  # atomic: a reader never sees half a copy
        log.info("kept the converted model in %s for faster starts (--no-cache to turn off)", entry)
    except Exception as exc:  # the model itself loaded fine: serve it anyway
        log.warning("could not keep the converted model in %s: %s", entry, exc)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
