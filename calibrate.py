"""Which weight format and kernels a model's linear layers use on this CPU: measured, not assumed.

The fastest path differs by machine more than by model. On a CPU with AVX-512 BF16 the int4 kernels fed bf16 win
everywhere; on one with AVX2 only, the same kernels fed float32 (what a float32 model feeds them) are 10-50x slower
than fed bf16, a bf16 matmul of a prefill chunk is 5x slower than a float32 one, and a decode step reads its weights
from memory at about 10 GB/s, so a float32 layer takes 4x longer than a 4-bit one (`bench/cpu_paths.py`). So at
load, for each shape of linear layer the model has, this times the candidates on random weights of that shape, through
the same `QuantizedLinear` code that serves:

- the weight format: 4, 8 or 16 bits, each at least the checkpoint's own (a GGUF file's level is where the search
  starts, never lowered: requantizing loses what the file kept; `--quantize` fixes it);
- the dtype the kernel is fed at one row and at a decode batch (float32 or bf16, the input cast around the call;
  `--dtype` fixes it);
- for a prefill chunk's many rows, the kernel or a copy dequantized for the call, in float32 or bf16.

Each timing cycles through enough layers that their weights come from memory, as in a decode step, not from the
cache (a single layer timed alone looks 2-4x faster than it runs in a step). The weight format is the one whose
estimated step (all linear layers of the model) is closest to the best at both one row and a decode batch; each
format's own kernels are chosen the same way. The result is kept in the cache directory, keyed by the CPU, torch,
the thread count and the model, so a machine measures once and every start serves the same way.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from devices import cpu_identity
from quantize import GROUP_SIZES, INT4_GROUP, QuantizedLinear, quantize_linear

log = logging.getLogger(__name__)

VERSION = 1  # of what is measured and how; a new one measures again
DECODE_ROWS = (1, 16)  # a lone stream and a decode batch
PREFILL_ROWS = 256  # a prefill chunk's rows (from quantize.DENSE_ROWS on, a dequantized copy may serve them)
SAMPLE_BYTES = 64 << 20  # weights one timing cycles through: past the last-level cache of most CPUs
TIMING_S = 0.015  # wall time a timing runs for, at least two passes over its layers
SLOWER = 2.0  # an activation dtype this much slower at one row is not timed at a decode batch


@dataclass(frozen=True)
class Shape:
    """The linear layers of one shape in a model: (in, out), how many, and whether it is the LM head."""

    inputs: int
    outputs: int
    count: int
    head: bool = False
    bits: int | None = None  # already quantized at this width (a checkpoint published quantized)

    @property
    def key(self) -> str:
        return f"{self.inputs}x{self.outputs}{'-head' if self.head else ''}"

    def format(self, bits: int) -> int:
        """The weight bits this shape gets when the model is served at `bits` (as quantize_model does it: the LM
        head at 8, a width int4 cannot group stays dense)."""
        if self.bits is not None:
            return self.bits
        if bits == 16:
            return 16
        if self.head or bits == 8:
            return 8
        return 4 if self.inputs % GROUP_SIZES[-1] == 0 else 16


@dataclass(frozen=True)
class Route:
    """How the layers of one shape multiply at one weight format, and what each way measured (µs per call)."""

    bits: int
    act: str | None  # dtype the kernel is fed; None: dense layers, in the model's dtype
    dense: str | None  # dtype of the copy dequantized for many rows; None: the kernel
    us: dict[str, float] = field(default_factory=dict)  # "1", "16", "256" rows → µs for the route chosen
    tried: dict[str, float] = field(default_factory=dict)  # "act@rows" / "dense@rows" → µs of every candidate


@dataclass(frozen=True)
class Plan:
    """The measured choice for one model on this machine."""

    bits: int  # weight bits served
    shapes: tuple[Shape, ...]
    routes: dict[str, dict[int, Route]]  # shape key → format bits → route
    step_us: dict[int, dict[str, float]]  # bits → rows → µs of all linear layers of one step
    prefill_us_per_token: float  # the linear layers' cost of one prompt token at PREFILL_ROWS, at `bits`
    seconds: float  # how long the measurement took
    cached: bool = False
    forced: str = ""  # the flags that fixed a choice, for the log

    def route(self, shape: Shape) -> Route | None:
        return self.routes.get(shape.key, {}).get(shape.format(self.bits))

    def slower_than_best(self) -> float:
        """How much slower the served bits estimate against the best candidate (1.0: it is the best)."""
        return max(self.step_us[self.bits][r] / min(s[r] for s in self.step_us.values()) for r in _rows_keys())

    def describe(self) -> dict[str, Any]:
        """What /health and the log show: the chosen path per shape and its measured times."""
        layers = {}
        for shape in self.shapes:
            if (r := self.route(shape)) is not None:
                layers[shape.key] = {
                    "count": shape.count,
                    "bits": r.bits,
                    "act": r.act,
                    "dense": r.dense,
                    "us": r.us,
                }
        return {
            "bits": self.bits,
            "step_us": {str(b): v for b, v in sorted(self.step_us.items())},
            "layers": layers,
            "prefill_us_per_token": round(self.prefill_us_per_token, 1),
            "seconds": round(self.seconds, 2),
            "cached": self.cached,
            **({"forced": self.forced} if self.forced else {}),
        }


def _rows_keys() -> tuple[str, ...]:
    return tuple(str(r) for r in DECODE_ROWS)


def shapes_of(model: nn.Module) -> list[Shape]:
    """The linear layers of a model grouped by shape (nn.Linear, and QuantizedLinear at their fixed width)."""
    head = _head(model)
    counts: dict[tuple[int, int, bool, int | None], int] = {}
    key: tuple[int, int, bool, int | None]
    for module in model.modules():
        if isinstance(module, nn.Linear):
            key = (module.in_features, module.out_features, module is head, None)
        elif isinstance(module, QuantizedLinear):
            key = (module.in_features, module.out_features, module is head, module.bits)
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return [Shape(i, o, n, h, b) for (i, o, h, b), n in sorted(counts.items(), key=lambda kv: str(kv[0]))]


def calibrate(
    shapes: list[Shape],
    candidates: list[int],
    dtype: torch.dtype,
    acts: list[torch.dtype],
    cache: Path | None = None,
    identity: dict[str, Any] | None = None,
    forced: str = "",
) -> Plan:
    """Measure (or read from `cache`) the routes of every shape at each candidate bits and choose the bits."""
    key = _key(shapes, candidates, dtype, acts, identity or {})
    path = None if cache is None else cache / "calibration" / f"{key}.json"
    if path is not None and (plan := _read(path)) is not None:
        return replace(plan, cached=True, forced=forced)
    log.info("measuring this CPU's kernels at %s bits (once per machine and model)", "/".join(map(str, candidates)))
    start = time.perf_counter()
    routes: dict[str, dict[int, Route]] = {}
    with torch.inference_mode():
        for shape in shapes:
            for bits in sorted({shape.format(b) for b in candidates}):
                routes.setdefault(shape.key, {})[bits] = _measure(shape, bits, dtype, acts)
    step_us = {
        b: {r: round(sum(s.count * routes[s.key][s.format(b)].us[r] for s in shapes), 1) for r in _rows_keys()}
        for b in candidates
    }
    bits = choose(step_us)
    prefill = sum(s.count * routes[s.key][s.format(bits)].us.get(str(PREFILL_ROWS), 0.0) for s in shapes) / PREFILL_ROWS
    plan = Plan(bits, tuple(shapes), routes, step_us, prefill, time.perf_counter() - start, False, forced)
    if path is not None:
        _write(path, plan)
    return plan


def choose(step_us: dict[int, dict[str, float]]) -> int:
    """The bits whose estimated step is closest to the best at every row count (the smallest worst ratio); within
    3% of each other, the fewer bits (less memory, room for more requests)."""
    best = {r: min(s[r] for s in step_us.values()) for r in _rows_keys()}
    regret = {b: max(s[r] / best[r] for r in _rows_keys()) for b, s in step_us.items()}
    least = min(regret.values())
    return min(b for b, g in regret.items() if g <= least * 1.03)


def choose_act(tried: dict[str, dict[int, float]]) -> str:
    """The activation dtype closest to the best at every decode row count it was timed at."""
    rows = [r for r in DECODE_ROWS if all(r in t for t in tried.values())]
    best = {r: min(t[r] for t in tried.values()) for r in rows}
    return min(tried, key=lambda a: max(tried[a][r] / best[r] for r in rows))


# ---- measuring ---------------------------------------------------------------------------------


def _measure(shape: Shape, bits: int, dtype: torch.dtype, acts: list[torch.dtype]) -> Route:
    """Time one shape at one weight format: its kernel's activation dtype, then how it takes many rows."""
    layers = _sample(shape, bits, dtype)
    inputs = {
        r: torch.randn(r, shape.inputs, generator=torch.Generator().manual_seed(r)).to(dtype) for r in _all_rows()
    }
    tried: dict[str, float] = {}
    if bits == 16:
        us = {str(r): _time(layers, inputs[r]) for r in _all_rows(shape)}
        tried.update({f"dense@{r}": t for r, t in us.items()})
        return Route(16, None, None, us, tried)
    quantized = [m for m in layers if isinstance(m, QuantizedLinear)]
    for m in quantized:
        m.set_dense(None)
    timed: dict[str, dict[int, float]] = {}
    for act in acts:
        for m in quantized:
            m.set_act(act)
        timed[_name(act)] = {1: _time(layers, inputs[1])}
    fastest = min(t[1] for t in timed.values())
    for act in acts:
        if timed[_name(act)][1] <= SLOWER * fastest:
            for m in quantized:
                m.set_act(act)
            for r in DECODE_ROWS[1:]:
                timed[_name(act)][r] = _time(layers, inputs[r])
    tried.update({f"{a}@{r}": t for a, rows in timed.items() for r, t in rows.items()})
    act_name = choose_act({a: rows for a, rows in timed.items() if all(r in rows for r in DECODE_ROWS)})
    act = getattr(torch, act_name)
    for m in quantized:
        m.set_act(act)
    us = {str(r): timed[act_name][r] for r in DECODE_ROWS}
    dense: str | None = None
    if not shape.head:  # the LM head sees one row a prompt, never a chunk's
        many = {"kernel": _time(layers, inputs[PREFILL_ROWS])}
        if quantized and all(m.unpacks for m in quantized):
            for option in acts:
                for m in quantized:
                    m.set_dense(option)
                many[_name(option)] = _time(layers, inputs[PREFILL_ROWS])
        tried.update({f"{k}@{PREFILL_ROWS}": t for k, t in many.items()})
        way = min(many, key=lambda k: many[k])
        dense = None if way == "kernel" else way
        us[str(PREFILL_ROWS)] = many[way]
    return Route(bits, act_name, dense, us, tried)


def _all_rows(shape: Shape | None = None) -> tuple[int, ...]:
    return DECODE_ROWS if shape is not None and shape.head else (*DECODE_ROWS, PREFILL_ROWS)


def _sample(shape: Shape, bits: int, dtype: torch.dtype) -> list[nn.Module]:
    """Enough layers of this shape and format, with random weights, that cycling through them reads memory: one made
    by the serving code (quantize_linear, with its checks), the rest copies of it (a kernel's speed does not depend on
    the values, and copying is far quicker than quantizing)."""
    per_layer = shape.inputs * shape.outputs * (dtype.itemsize if bits == 16 else bits / 8)
    count = max(1, min(shape.count, math.ceil(SAMPLE_BYTES / per_layer)))
    generator = torch.Generator().manual_seed(shape.inputs * 7 + shape.outputs)
    linear = nn.Linear(shape.inputs, shape.outputs, bias=False)
    linear.weight.data = torch.randn(shape.outputs, shape.inputs, generator=generator) * 0.02
    first = linear.to(dtype) if bits == 16 else quantize_linear(linear, bits, INT4_GROUP, dtype, "cpu")
    return [first, *(copy.deepcopy(first) for _ in range(count - 1))]


def _time(layers: list[nn.Module], x: torch.Tensor) -> float:
    """µs per call of `layer(x)` for about TIMING_S, cycling through the layers: after a first pass over all of
    them, each call finds its weights as long ago as the whole sample (out of the cache, as in a step). A prefill's
    many rows reuse each weight they read, so there one layer does."""
    layers = layers if x.shape[0] < PREFILL_ROWS else layers[:2]
    for layer in layers:  # the first call of a kernel may set itself up
        layer(x)
    calls, start = 0, time.perf_counter()
    while True:
        layers[calls % len(layers)](x)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= TIMING_S and calls >= 3:
            return round(elapsed / calls * 1e6, 1)


def _head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- the cache ---------------------------------------------------------------------------------


def model_identity(path: Path) -> dict[str, Any]:
    """What makes a model the same model: its file (or its directory's files) by name, size and time."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"path": str(path.resolve()), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def _key(
    shapes: list[Shape], candidates: list[int], dtype: torch.dtype, acts: list[torch.dtype], identity: dict[str, Any]
) -> str:
    what = {
        "version": VERSION,
        "cpu": cpu_identity(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shapes": [asdict(s) for s in shapes],
        "candidates": candidates,
        "dtype": _name(dtype),
        "acts": [_name(a) for a in acts],
        "model": identity,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def _read(path: Path) -> Plan | None:
    try:
        raw = json.loads(path.read_text())
        routes = {
            key: {int(b): Route(**route) for b, route in formats.items()} for key, formats in raw["routes"].items()
        }
        step_us = {int(b): rows for b, rows in raw["step_us"].items()}
        shapes = tuple(Shape(**s) for s in raw["shapes"])
        return Plan(raw["bits"], shapes, routes, step_us, raw["prefill_us_per_token"], raw["seconds"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged entry is measured again
        log.warning("ignoring the kernel calibration in %s: %s", path, exc)
        return None


def _write(path: Path, plan: Plan) -> None:
    """Keep the plan for the next start; a cache that cannot be written only costs the next start a few seconds."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = asdict(plan)
        body.pop("cached"), body.pop("forced")
        partial.write_text(json.dumps(body, indent=1))
        os.replace(partial, path)
    except OSError as exc:
        log.warning("could not keep the kernel calibration in %s: %s", path, exc)


def apply(model: nn.Module, plan: Plan) -> None:
    """Set every quantized layer of the model on its shape's measured route."""
    head = _head(model)
    routes = {s.key: plan.route(s) for s in plan.shapes}
    for module in model.modules():
        if not isinstance(module, QuantizedLinear):
            continue
        route = routes.get(Shape(module.in_features, module.out_features, 0, module is head).key)
        if route is None or route.act is None or route.bits != module.bits:
            continue
        module.set_act(getattr(torch, route.act))
        module.set_dense(None if route.dense is None else getattr(torch, route.dense))
