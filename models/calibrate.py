"""Which weight format and kernels a model's linear layers use on this CPU: measured, not assumed.

The fastest path differs by machine more than by model. On a CPU with AVX-512 BF16 the int4 kernels fed bf16 win
everywhere; on one with AVX2 only, the same kernels fed float32 (what a float32 model feeds them) are many times slower
than fed bf16, a bf16 matmul of a prefill chunk is slower than a float32 one, and a decode step is bound by reading its
weights from memory, so a float32 layer takes longer than a 4-bit one (`bench/cpu_paths.py`, figures in
bench/README.md). So at load, for each shape of linear layer the model has, this times the candidates on random weights
of that shape, through the same `QuantizedLinear` code that serves:

- the weight format: 4, 8 or 16 bits, each at least the checkpoint's own (a GGUF file's level is where the search
  starts, never lowered: requantizing loses what the file kept; `--quantize` fixes it);
- the dtype the kernel is fed at one row and at a decode batch (float32 or bf16, the input cast around the call;
  `--dtype` fixes it), and for the LM head also int8 inputs through FBGEMM's int8 GEMM (models/int8_inputs.py);
- for a prefill chunk's many rows, the kernel or a copy dequantized for the call, in float32 or bf16.

What is timed is what a decode step multiplies in one call (a unit): a layer, or a layer's q/k/v and its gate/up
projections, which the plain decode step computes as one (`generation/lean.py` `prepare`). Each timing cycles through
enough copies that their weights come from memory, as in a decode step, not from the cache (a single layer timed alone
looks several times faster than it runs in a step). The model gets the width whose estimated step (its units' times
added up) is closest to the best at both one row and a decode batch (the smallest worst ratio; within `TIE`, the fewer
bits); each unit's kernels are chosen the same way at that width. The result is kept in the cache directory, keyed by
the CPU, torch, the thread count and the model, so a machine measures once and every start serves the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.devices import cpu_identity
from models.llama_layout import projection_groups
from models.quantize import GROUP_SIZES, INT8_INPUTS, QuantizedLinear
from models.timing import dense_copy, sample_layers, time_layers

log = logging.getLogger(__name__)

VERSION = 5  # of what is measured and how; a new one measures again
DECODE_ROWS = (1, 16)  # a lone stream and a decode batch
PREFILL_ROWS = 256  # a prefill chunk's rows (from quantize.DENSE_ROWS on, a dequantized copy may serve them)
SLOWER = 2.0  # an activation dtype this much slower at one row is not timed at a decode batch
TIE = 1.03  # formats within this of each other: the fewer bits


@dataclass(frozen=True)
class Shape:
    """A unit of the model's linear layers: one layer, or layers that read the same input and a decode step
    multiplies as one (their output widths in `parts`); how many such units the model has; whether it is the LM
    head; the width it is already quantized at (a checkpoint published quantized)."""

    inputs: int
    parts: tuple[int, ...]
    count: int
    head: bool = False
    bits: int | None = None

    @property
    def outputs(self) -> int:
        return sum(self.parts)

    @property
    def key(self) -> str:
        return f"{self.inputs}x{'+'.join(map(str, self.parts))}{'-head' if self.head else ''}"

    def format(self, bits: int) -> int:
        """The weight bits this unit gets when asked for `bits` (as quantize_model does it: the LM head at 8 below
        16, a width int4 cannot group stays dense)."""
        if self.bits is not None:
            return self.bits
        if bits == 16:
            return 16
        if self.head or bits == 8:
            return 8
        return 4 if self.inputs % GROUP_SIZES[-1] == 0 else 16


@dataclass(frozen=True)
class Route:
    """How a unit multiplies at one weight format, and what each way measured (µs per call)."""

    bits: int
    act: str | None  # dtype the kernel is fed, or "int8" (an LM head on FBGEMM); None: dense layers, as the model
    dense: str | None  # dtype of the copy dequantized for many rows; None: the kernel
    us: dict[str, float] = field(default_factory=dict)  # "1", "16", "256" rows → µs for the route chosen
    held: str | None = None  # dtype of the copy a long prompt's chunks share (dequantized once); None: as `dense`
    tried: dict[str, float] = field(default_factory=dict)  # "act@rows" / "dense@rows" → µs of every candidate


@dataclass(frozen=True)
class Plan:
    """The measured choice for one model on this machine."""

    bits: int  # the width most of the weights are served at
    shapes: tuple[Shape, ...]
    routes: dict[str, dict[int, Route]]  # unit key → format bits → route
    choice: dict[str, int]  # unit key → the format served
    step_us: dict[str, dict[str, float]]  # "4"/"8"/"16" (every unit at it) and "chosen" → rows → µs of one step
    seconds: float  # how long the measurement took
    cached: bool = False
    forced: str = ""  # the flags that fixed a choice, for the log

    def route(self, key: str) -> Route | None:
        return self.routes.get(key, {}).get(self.choice.get(key, 0))

    @property
    def prefill_us_per_token(self) -> float:
        """The linear layers' cost of one prompt token at PREFILL_ROWS rows, as chosen."""
        total = 0.0
        for shape in self.shapes:
            route = self.route(shape.key)
            total += shape.count * (route.us.get(str(PREFILL_ROWS), 0.0) if route is not None else 0.0)
        return total / PREFILL_ROWS

    def slower_than_best(self) -> float:
        """How much slower the served choice estimates against the best uniform width (1.0: no slower)."""
        best = {r: min(s[r] for b, s in self.step_us.items() if b != "chosen") for r in _rows_keys()}
        return max(self.step_us["chosen"][r] / best[r] for r in _rows_keys())

    def describe(self) -> dict[str, Any]:
        """What /health and the log show: the chosen path per unit, its measured times and the other widths'."""
        layers = {}
        for shape in self.shapes:
            if (r := self.route(shape.key)) is not None:
                layers[shape.key] = {
                    "count": shape.count,
                    "bits": r.bits,
                    "act": r.act,
                    "dense": r.dense,
                    "held": r.held or r.dense,
                    "us": r.us,
                    "by_bits": {
                        str(b): {k: route.us[k] for k in _rows_keys()} for b, route in self.routes[shape.key].items()
                    },
                }
        return {
            "bits": self.bits,
            "step_us": self.step_us,
            "layers": layers,
            "prefill_us_per_token": round(self.prefill_us_per_token, 1),
            "seconds": round(self.seconds, 2),
            "cached": self.cached,
            **({"forced": self.forced} if self.forced else {}),
        }


def _rows_keys() -> tuple[str, ...]:
    return tuple(str(r) for r in DECODE_ROWS)


def units(model: nn.Module) -> dict[str, str]:
    """Every linear layer's name → the key of its unit (a layer alone, or the projections a decode step fuses)."""
    head = _head(model)
    modules = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))}
    keys: dict[str, str] = {}
    for group in projection_groups(model):
        members = [modules.get(name) for name in group]
        if any(m is None for m in members) or len({_width(m) for m in members}) != 1:
            continue
        shape = _shape([m for m in members if m is not None], head)
        keys.update((name, shape.key) for name in group)
    for name, m in modules.items():
        keys.setdefault(name, _shape([m], head).key)
    return keys


def shapes_of(model: nn.Module) -> list[Shape]:
    """The model's units grouped by shape, with how many of each."""
    head = _head(model)
    names = units(model)
    members: dict[str, list[str]] = {}
    for name, key in names.items():
        members.setdefault(key, []).append(name)
    shapes = []
    for key, group in members.items():
        first = [model.get_submodule(n) for n in group if names[n] == key]
        parts = len(_shape_parts(key))
        shapes.append(replace(_shape(first[:parts], head), count=len(group) // parts))
    return sorted(shapes, key=lambda s: s.key)


def _shape_parts(key: str) -> list[str]:
    return key.split("x", 1)[1].removesuffix("-head").split("+")


def _width(m: nn.Module | None) -> tuple[int, int | None]:
    assert isinstance(m, (nn.Linear, QuantizedLinear))
    return (m.in_features, m.bits if isinstance(m, QuantizedLinear) else None)


def _shape(members: list[nn.Module], head: nn.Module | None) -> Shape:
    layers = [m for m in members if isinstance(m, (nn.Linear, QuantizedLinear))]
    first = layers[0]
    bits = first.bits if isinstance(first, QuantizedLinear) else None
    return Shape(first.in_features, tuple(m.out_features for m in layers), 1, first is head, bits)


def calibrate(
    shapes: list[Shape],
    candidates: list[int],
    dtype: torch.dtype,
    acts: list[torch.dtype],
    cache: Path | None = None,
    identity: dict[str, Any] | None = None,
    forced: str = "",
    fixed: int | None = None,
    int8_head: bool = False,
) -> Plan:
    """Measure (or read from `cache`) every unit at each candidate width, and choose each unit's (or serve every
    unit at `fixed`, measuring the rest only to say how it compares). `int8_head`: the LM head may take int8
    inputs."""
    key = _key(shapes, candidates, dtype, acts, {**(identity or {}), "int8_head": int8_head})
    path = None if cache is None else cache / "calibration" / f"{key}.json"
    plan = None if path is None else _read(path)
    if plan is None:
        log.info("measuring this CPU's kernels at %s bits (once per machine and model)", "/".join(map(str, candidates)))
        start = time.perf_counter()
        routes: dict[str, dict[int, Route]] = {}
        with torch.inference_mode():
            for shape in shapes:
                for bits in sorted({shape.format(b) for b in candidates}):
                    routes.setdefault(shape.key, {})[bits] = _measure(shape, bits, dtype, acts, int8_head)
        uniform = _plan(shapes, candidates, routes, {}, 0.0).step_us
        bits = choose({int(b): step for b, step in uniform.items() if b != "chosen"})
        choice = {s.key: s.format(bits) for s in shapes}
        with torch.inference_mode():
            for shape in shapes:
                route = routes[shape.key][choice[shape.key]]
                routes[shape.key][choice[shape.key]] = _measure_held(shape, route, dtype, acts)
        plan = _plan(shapes, candidates, routes, choice, time.perf_counter() - start)
        if path is not None:
            _write(path, plan)
    else:
        plan = replace(plan, cached=True)
    if fixed is not None:
        plan = _plan(
            list(plan.shapes),
            candidates,
            plan.routes,
            {s.key: s.format(fixed) for s in plan.shapes},
            plan.seconds,
            plan.cached,
        )
        plan = replace(plan, bits=fixed)
    return replace(plan, forced=forced)


def _plan(
    shapes: list[Shape],  # every unit's format comes from `choice` (empty: only the uniform estimates)
    candidates: list[int],
    routes: dict[str, dict[int, Route]],
    choice: dict[str, int],
    seconds: float,
    cached: bool = False,
) -> Plan:
    def step(pick: dict[str, int]) -> dict[str, float]:
        return {r: round(sum(s.count * routes[s.key][pick[s.key]].us[r] for s in shapes), 1) for r in _rows_keys()}

    step_us = {str(b): step({s.key: s.format(b) for s in shapes}) for b in candidates}
    if choice:
        step_us["chosen"] = step(choice)
    weights: dict[int, int] = {}
    for s in shapes:
        if not s.head and s.key in choice:
            weights[choice[s.key]] = weights.get(choice[s.key], 0) + s.count * s.inputs * s.outputs
    bits = max(weights, key=lambda b: (weights[b], -b)) if weights else 16
    return Plan(bits, tuple(shapes), routes, choice, step_us, seconds, cached)


def choose(step_us: dict[int, dict[str, float]]) -> int:
    """The width whose estimated step is closest to the best at every decode row count (the smallest worst ratio);
    within 3% of each other, the fewer bits (less memory, room for more requests). One width for the whole model:
    choosing it unit by unit (8 bits where a unit alone measured faster at 8) measured about 5% slower in whole
    decode steps on an AVX2 CPU than 4 bits throughout, as units timed alone do not see each other's memory
    traffic (bench/README.md)."""
    rows = _rows_keys()
    best = {r: min(s[r] for s in step_us.values()) for r in rows}
    regret = {b: max(s[r] / best[r] for r in rows) for b, s in step_us.items()}
    least = min(regret.values())
    return min(b for b, g in regret.items() if g <= least * TIE)


def choose_act(tried: dict[str, dict[int, float]]) -> str:
    """The activation dtype closest to the best at every decode row count it was timed at."""
    rows = [r for r in DECODE_ROWS if all(r in t for t in tried.values())]
    best = {r: min(t[r] for t in tried.values()) for r in rows}
    return min(tried, key=lambda a: max(tried[a][r] / best[r] for r in rows))


# ---- measuring ---------------------------------------------------------------------------------


def _measure(shape: Shape, bits: int, dtype: torch.dtype, acts: list[torch.dtype], int8_head: bool = False) -> Route:
    """Time one unit at one weight format: what its kernel is fed, then how it takes many rows."""
    layers = sample_layers(shape.inputs, shape.outputs, shape.count, bits, dtype)
    generator = torch.Generator().manual_seed(0)
    inputs = {r: torch.randn(r, shape.inputs, generator=generator).to(dtype) for r in _all_rows()}
    tried: dict[str, float] = {}
    if bits == 16:
        us = {str(r): time_layers(layers, inputs[r], reuse=r >= PREFILL_ROWS) for r in _all_rows(shape)}
        tried.update({f"dense@{r}": t for r, t in us.items()})
        return Route(16, None, None, us, tried=tried)
    quantized = [m for m in layers if isinstance(m, QuantizedLinear)]
    for m in quantized:
        m.set_dense(None)
        if shape.head:
            m.keep_top_exact()  # as served: either way pays for its exact top logits
    ways = [_name(a) for a in acts] + ([INT8_INPUTS] if shape.head and int8_head else [])
    timed: dict[str, dict[int, float]] = {}
    for way in ways:
        if _feed(quantized, way):  # int8 inputs may be unavailable here
            timed[way] = {1: time_layers(layers, inputs[1])}
    fastest = min(t[1] for way, t in timed.items() if way != INT8_INPUTS)
    for way in timed:
        # dtypes are compared with each other only, and int8 inputs always timed at a batch: they slow with rows
        # unlike the weight-only kernel, so neither side's one-row time says how the other fares at 16
        if timed[way][1] <= SLOWER * fastest or way == INT8_INPUTS:
            _feed(quantized, way)
            for r in DECODE_ROWS[1:]:
                timed[way][r] = time_layers(layers, inputs[r], reuse=r >= PREFILL_ROWS)
    tried.update({f"{a}@{r}": t for a, rows in timed.items() for r, t in rows.items()})
    act_name = choose_act({a: rows for a, rows in timed.items() if all(r in rows for r in DECODE_ROWS)})
    _feed(quantized, act_name)
    us = {str(r): timed[act_name][r] for r in DECODE_ROWS}
    dense: str | None = None
    if not shape.head:  # the LM head sees one row a prompt, never a chunk's
        many = {"kernel": time_layers(layers, inputs[PREFILL_ROWS], reuse=True)}
        if quantized and all(m.unpacks for m in quantized):
            for option in acts:
                for m in quantized:
                    m.set_dense(option)
                many[_name(option)] = time_layers(layers, inputs[PREFILL_ROWS], reuse=True)
        tried.update({f"{k}@{PREFILL_ROWS}": t for k, t in many.items()})
        way = min(many, key=lambda k: many[k])
        dense = None if way == "kernel" else way
        us[str(PREFILL_ROWS)] = many[way]
    return Route(bits, act_name, dense, us, tried=tried)


def _feed(layers: list[QuantizedLinear], way: str) -> bool:
    """Feed the layers' kernels a dtype (its name), or int8 inputs (INT8_INPUTS); whether they all can."""
    if way == INT8_INPUTS:
        return all([m.set_int8_inputs() for m in layers])
    for m in layers:
        m.set_act(getattr(torch, way))
    return True


def _measure_held(shape: Shape, route: Route, dtype: torch.dtype, acts: list[torch.dtype]) -> Route:
    """The dtype of the copy a long prompt's chunks share (dequantized once, so only its matmul counts), where
    such a copy beats the chosen many-rows route; timed for the served width only."""
    if shape.head or route.bits == 16 or str(PREFILL_ROWS) not in route.us:
        return route
    layers = [
        m for m in sample_layers(shape.inputs, shape.outputs, 2, route.bits, dtype) if isinstance(m, QuantizedLinear)
    ]
    if not all(m.unpacks for m in layers):
        return route
    x = torch.randn(PREFILL_ROWS, shape.inputs, generator=torch.Generator().manual_seed(0))
    kept = {_name(o): time_layers([dense_copy(m, o) for m in layers], x.to(o), reuse=True) for o in acts}
    best = min(kept, key=lambda k: kept[k])
    held = best if kept[best] < route.us[str(PREFILL_ROWS)] else route.dense
    return replace(route, held=held, tried={**route.tried, **{f"held_{k}@{PREFILL_ROWS}": t for k, t in kept.items()}})


def _all_rows(shape: Shape | None = None) -> tuple[int, ...]:
    return DECODE_ROWS if shape is not None and shape.head else (*DECODE_ROWS, PREFILL_ROWS)


def _head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def apply(model: nn.Module, plan: Plan) -> None:
    """Set every quantized layer of the model on its unit's measured route."""
    for name, key in units(model).items():
        module = model.get_submodule(name)
        route = plan.route(key)
        if not isinstance(module, QuantizedLinear) or route is None or route.act is None or route.bits != module.bits:
            continue
        if not _feed([module], route.act):  # measured on this CPU and torch, so not expected
            fallback = _fastest_dtype(route)
            log.warning("%s: int8 inputs measured fastest but are unavailable now; fed %s", name, fallback)
            if fallback is not None:
                _feed([module], fallback)
        held = route.held or route.dense
        module.set_dense(
            None if route.dense is None else getattr(torch, route.dense), None if held is None else getattr(torch, held)
        )


def _fastest_dtype(route: Route) -> str | None:
    """The dtype `choose_act` would have chosen from the route's timings without int8 inputs (None: none timed)."""
    by_dtype: dict[str, dict[int, float]] = {}
    for key, us in route.tried.items():
        way, _, rows = key.partition("@")
        if rows.isdigit() and int(rows) in DECODE_ROWS and isinstance(getattr(torch, way, None), torch.dtype):
            by_dtype.setdefault(way, {})[int(rows)] = us
    timed = {way: rows for way, rows in by_dtype.items() if all(r in rows for r in DECODE_ROWS)}  # as `_measure`
    return choose_act(timed) if timed else None


def layer_bits(model: nn.Module, plan: Plan) -> dict[str, int]:
    """Every linear layer's name → the width its unit is served at (for quantize.quantize_model)."""
    return {name: plan.choice[key] for name, key in units(model).items() if key in plan.choice}


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
        shapes = tuple(Shape(**{**s, "parts": tuple(s["parts"])}) for s in raw["shapes"])
        return Plan(raw["bits"], shapes, routes, raw["choice"], raw["step_us"], raw["seconds"])
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
