"""Every way PyTorch offers to multiply by a linear layer's weights on this CPU, per layer shape, at one row, a decode
batch of 16 and a prefill chunk of 256 rows: the candidates the calibration (models/calibrate.py) picks from, and those
it leaves out, with their error against float32.

  fp32, bf16           dense weights, fed their own dtype
  i8_f32, i8_bf16      `_weight_int8pack_mm` (int8 rows), fed float32 or bf16 (the input cast around the call)
  i4_f32, i4_bf16      `_weight_int4pack_mm_for_cpu` (int4 groups of 32), fed float32 or bf16
  fbgemm_dyn_int8      FBGEMM's dynamic int8 linear (`quantized::linear_dynamic`): int8 weights and activations
                       quantized per call, per tensor, to 7 bits (its `reduce_range`, which AVX2 needs to not
                       saturate); left out: its activation rounding moves the bundled model's answers (see
                       bench/README.md), and the quantized tensors it is built from are deprecated since torch 2.13

Each timing cycles through copies of the layer that together exceed the last-level cache (a decode step reads its
weights from memory), or with --cached times one copy over and over (how a microbenchmark flatters the big formats).

    .venv/bin/python bench/cpu_paths.py [--cached] [--shapes 576x1536 1536x576 576x192 576x49152 4096x4096]

Writes bench/results/cpu_paths_<instruction set>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_BYTES = 64 << 20


def timed(calls: Sequence[Callable[[], Any]], budget: float = 0.1) -> float:
    """µs a call, cycling through `calls` (after one pass over all of them) for about `budget` seconds."""
    for call in calls:
        call()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget or n < 3:
        calls[n % len(calls)]()
        n += 1
    return round((time.perf_counter() - start) / n * 1e6, 1)


def weights(inputs: int, outputs: int, generator: torch.Generator) -> dict[str, Any]:
    """One layer's weights in every format (random: a kernel's speed does not depend on the values)."""
    w = torch.randn(outputs, inputs, generator=generator) * 0.02
    scale = (w.abs().amax(-1) / 127).clamp(min=1e-12)
    q8 = torch.round(w / scale[:, None]).to(torch.int8)
    low, high = w.reshape(outputs, -1, 32).amin(-1), w.reshape(outputs, -1, 32).amax(-1)
    step = ((high - low) / 15).clamp(min=1e-12)
    u = torch.round((w.reshape(outputs, -1, 32) - low[..., None]) / step[..., None]).clamp(0, 15)
    sz = torch.stack([step.t(), (low + 8 * step).t()], dim=-1).contiguous()  # [in/32, out, 2]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.reshape(outputs, inputs).to(torch.int32), 1)
    with warnings.catch_warnings():  # quantized tensors are deprecated (pytorch/pytorch#184982): measured, not served
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(outputs, dtype=torch.long), 0, torch.qint8)
        fbgemm = torch.ops.quantized.linear_prepack(qw, None)
    return {
        "w": w,
        "w16": w.bfloat16(),
        "q8": q8,
        "s": scale,
        "s16": scale.bfloat16(),
        "p4": packed,
        "sz": sz,
        "sz16": sz.bfloat16(),
        "fbgemm": fbgemm,
    }


def paths(layer: dict[str, Any]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    aten = torch.ops.aten
    return {
        "fp32": lambda x: F.linear(x, layer["w"]),
        "bf16": lambda x: F.linear(x.bfloat16(), layer["w16"]).float(),
        "i8_f32": lambda x: aten._weight_int8pack_mm(x, layer["q8"], layer["s"]),
        "i8_bf16": lambda x: aten._weight_int8pack_mm(x.bfloat16(), layer["q8"], layer["s16"]).float(),
        "i4_f32": lambda x: aten._weight_int4pack_mm_for_cpu(x, layer["p4"], 32, layer["sz"]),
        "i4_bf16": lambda x: aten._weight_int4pack_mm_for_cpu(x.bfloat16(), layer["p4"], 32, layer["sz16"]).float(),
        "fbgemm_dyn_int8": lambda x: torch.ops.quantized.linear_dynamic(x, layer["fbgemm"], True),
    }


def sweep(inputs: int, outputs: int, cached: bool) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    copies = 1 if cached else max(1, math.ceil(SAMPLE_BYTES / (inputs * outputs / 2)))
    copies = min(copies, 64)
    layers = [weights(inputs, outputs, generator) for _ in range(copies)]
    out: dict[str, Any] = {"copies": copies}
    for rows in (1, 16, 256):
        if rows == 256 and outputs > 16384:
            continue  # an LM head sees one row a prompt
        x = torch.randn(rows, inputs, generator=generator)
        want = F.linear(x, layers[0]["w"])
        result = {}
        for name in paths(layers[0]):
            calls = [partial(paths(layer)[name], x) for layer in layers]
            first = time.perf_counter()
            calls[0]()
            if time.perf_counter() - first > 0.5:  # hopeless here: one call is the measurement
                result[name] = {"us": round((time.perf_counter() - first) * 1e6, 1)}
            else:
                result[name] = {"us": timed(calls)}
            got = paths(layers[0])[name](x)
            result[name]["max_error"] = round(float((got - want).abs().max() / want.abs().max()), 4)
        out[str(rows)] = result
        print(json.dumps({f"{inputs}x{outputs}": {str(rows): {k: v["us"] for k, v in result.items()}}}), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["576x1536", "1536x576", "576x192", "576x49152", "4096x4096"])
    p.add_argument("--cached", action="store_true", help="time one copy of the layer (cache-resident)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    isa = torch.backends.cpu.get_cpu_capability()
    report: dict[str, Any] = {
        "command": "bench/cpu_paths.py " + " ".join(sys.argv[1:]),
        "cpu": isa,
        "threads": torch.get_num_threads(),
    }
    with torch.inference_mode():
        for shape in args.shapes:
            inputs, outputs = (int(n) for n in shape.split("x"))
            report[shape] = sweep(inputs, outputs, args.cached)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu_paths_{isa.lower()}{'_cached' if args.cached else ''}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
