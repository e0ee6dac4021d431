"""Checkpoints as published: `pytorch_model-0000N-of-0000M.bin` shards with their index (or safetensors), read one
shard at a time into a model built on the meta device, so the peak stays near one copy of the model.

`.bin` shards are unpickled with `weights_only=True`: a file that needs code to unpickle is refused, never run.
Every problem is a CheckpointError whose message names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

log = logging.getLogger(__name__)

INDEXES = (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))


class CheckpointError(Exception):
    """A checkpoint that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class Shard:
    """One weights file and the keys its index says it holds (None without an index)."""

    path: Path
    keys: frozenset[str] | None


def find_shards(folder: Path) -> list[Shard]:
    """The weight files of a model directory, checked against their index: every listed shard must exist."""
    for index_name, single in INDEXES:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files: dict[str, set[str]] = {}
                for key, file in weight_map.items():
                    files.setdefault(str(file), set()).add(str(key))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index}: not a weight index ({exc!r})") from exc
            for file in sorted(files):
                if not (folder / file).is_file():
                    raise CheckpointError(f"{folder / file}: missing shard (listed in {index_name})")
            return [Shard(folder / file, frozenset(keys)) for file, keys in sorted(files.items())]
        if (folder / single).is_file():
            return [Shard(folder / single, None)]
    raise CheckpointError(f"{folder}: no weights (pytorch_model*.bin with its index, or model*.safetensors)")


def _listing(keys: set[str]) -> str:
    shown = sorted(keys)[:3]
    more = f" and {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
    return ", ".join(shown) + more


def read_shard(shard: Shard) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of one shard, after checking that its keys are the ones its index lists."""
    path = shard.path
    if path.suffix == ".safetensors":
        try:
            handle: Any = safe_open(str(path), framework="pt")
            keys = set(handle.keys())
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
        _check_keys(shard, keys)
        for key in sorted(keys):
            yield key, handle.get_tensor(key)
        return
    state = _unpickle(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    _check_keys(shard, set(state))
    yield from state.items()


def _unpickle(path: Path) -> Any:
    try:
        try:  # mmap: tensors are paged in as they are converted, not all at once
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
    except pickle.UnpicklingError as exc:
        # weights_only refuses anything but tensors and plain containers
        reason = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(f"{path}: refused: unpickling it would execute code ({reason})") from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc


def _check_keys(shard: Shard, keys: set[str]) -> None:
    if shard.keys is None or keys == shard.keys:
        return
    missing, extra = shard.keys - keys, keys - shard.keys
    problems = [f"lacks {_listing(set(missing))}" if missing else "", f"has {_listing(extra)}" if extra else ""]
    detail = " and ".join(p for p in problems if p)
    raise CheckpointError(f"{shard.path}: keys do not match the index: {detail}")


def place(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make `tensor` the module's parameter `name` (replacing its meta placeholder)."""
    module._parameters[name] = nn.Parameter(tensor, requires_grad=False)


def unfilled(model: nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device: weights the checkpoint did not provide."""
    return [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]


def log_progress(done: int, total: int, path: Path) -> None:
    log.info("loaded shard %d of %d (%s)", done, total, path.name)
