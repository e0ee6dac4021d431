"""How a loaded model runs: attention in float32 on a CPU, the plain decode step where it agrees with
transformers', prompts in chunks where the cache allows, and the batch that memory affords. `load_model` is the one
call that loads a model for serving."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from generation import lean
from generation.attention import fp32_attention
from generation.kv_cache import PLAIN_LAYERS
from models.devices import default_batch_size, free_memory
from models.loader import LoadedModel, ModelConfig, load

log = logging.getLogger(__name__)


def load_model(config: ModelConfig) -> LoadedModel:
    """Load a model (models/loader.py) and choose how it runs."""
    return prepare(load(config))


def prepare(lm: LoadedModel) -> LoadedModel:
    """The execution path of a loaded model. Switches its attention implementation (a process-wide registration)."""
    devices = list(lm.devices)
    dtype = getattr(torch, lm.dtype)
    fp32 = len(devices) == 1 and fp32_attention(lm.model, devices[0], dtype)
    # measured on a CPU only; on a GPU transformers' step keeps its attention kernels' choices
    plain_steps = devices == ["cpu"] and lean.agrees(lm.model, fp32, "cpu")
    kv_per_token = kv_bytes_per_token(lm.model.config, torch.float32 if fp32 else dtype)
    ready = replace(
        lm,
        chunked_prefill=lm.chunked_prefill and plain_cache(lm.model),
        fp32_attention=fp32,
        lean_decode=plain_steps,
        batch_size=default_batch_size(kv_per_token, lm.context_length, free_memory(devices)),
    )
    log.info(
        "loaded %s on %s: %s, %s-bit weights (%d bytes), context %d, up to %d requests at once by default; "
        "attention in %s, decode steps through %s",
        ready.name,
        ",".join(ready.devices),
        ready.dtype,
        ready.bits,
        ready.weight_bytes,
        ready.context_length,
        ready.batch_size,
        "float32" if ready.fp32_attention else ready.dtype,
        "plain functions (generation/lean.py)" if ready.lean_decode else "transformers",
    )
    return ready


def plain_cache(model: Any) -> bool:
    """Whether the model's cache has only plain growing layers (no sliding windows), which chunks extend safely."""
    from transformers.cache_utils import DynamicCache

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a config the cache cannot read: do not chunk
        return False
    return all(type(layer) in PLAIN_LAYERS for layer in layers)


def kv_bytes_per_token(config: Any, dtype: Any) -> int:
    """Keys and values one token adds to the cache, over all layers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", 0) or 0
    heads = getattr(text, "num_attention_heads", 1) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (getattr(text, "hidden_size", 0) or 0) // heads
    return int(2 * layers * kv_heads * head_dim * _bytes(dtype))


def _bytes(dtype: torch.dtype) -> int:
    return int(torch.empty((), dtype=dtype).element_size())
