"""Where a decode step's time goes besides the matmuls: the bundled model at its defaults (calibrated kernels), one
row and a batch of 16 after 100 cached tokens, each way alternated in one process for several rounds (medians):

  transformers   transformers' own forward pass
  modules        the plain step of `generation/lean.py`, each projection called as a module
  bound          the plain step, each projection a function with its kernel bound (`QuantizedLinear.few_rows`)
  fused          the plain step as served: bound, and q/k/v and gate/up each one call (`models/fusion.py`)

and the largest logit difference of each against transformers' step.

    .venv/bin/python bench/lean_decode.py [--rounds 5]

Writes bench/results/lean_decode.json (per CPU instruction set, see bench/README.md for the AVX2 emulation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generation import (  # noqa: E402
    batch,
    lean,
)
from generation.prepare import load_model  # noqa: E402
from models.loader import LoadedModel, ModelConfig, bundled_model_path, default_cache_dir  # noqa: E402
from models.quantize import QuantizedLinear  # noqa: E402


@contextmanager
def way(lm: LoadedModel, name: str) -> Iterator[LoadedModel]:
    """The model switched to one way of decoding, and back to the served one. Unfused, each layer gets its own
    int4 scales back (fused, they are views of the fused layer's, which its kernel would copy at every call)."""
    if name != "fused":
        for m in lm.model.modules():
            scales = m._buffers.get("scales_zeros") if isinstance(m, QuantizedLinear) else None
            if scales is not None and not scales.is_contiguous():
                m._buffers["scales_zeros"] = scales.contiguous()
                m._few = None
    lean.prepare(lm.model, fuse=name == "fused", bind=name in ("bound", "fused"))
    try:
        yield dataclasses.replace(lm, lean_decode=name != "transformers")
    finally:
        lean.prepare(lm.model)


def step_ms(lm: LoadedModel, rows: int, steps: int) -> tuple[float, torch.Tensor]:
    """Milliseconds a decode step of `rows` rows after 100 prompt tokens each, and the first step's logits."""
    with torch.inference_mode():
        kv = batch.KVBatch()
        for r in range(rows):
            _, cache = batch.prefill_chunk(lm, list(range(100 + r, 200 + r)), None)
            kv.add(cache, torch.ones(1, 100, dtype=torch.long))
        first = batch.decode_step(lm, kv, [5] * rows)
        for _ in range(3):
            batch.decode_step(lm, kv, [5] * rows)
        start = time.perf_counter()
        for _ in range(steps):
            batch.decode_step(lm, kv, [5] * rows)
    return (time.perf_counter() - start) / steps * 1000, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    lm = load_model(ModelConfig(path=bundled_model_path(), cache_dir=default_cache_dir()))
    assert lm.lean_decode, "the bundled model should take the plain step"
    ways = ("transformers", "modules", "bound", "fused")
    report: dict[str, Any] = {
        "command": "bench/lean_decode.py " + " ".join(sys.argv[1:]),
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "model": {"dtype": lm.dtype, "bits": lm.bits},
    }
    for rows, steps in ((1, 40), (16, 10)):
        times: dict[str, list[float]] = {w: [] for w in ways}
        logits: dict[str, torch.Tensor] = {}
        for _ in range(args.rounds):
            for name in ways:
                with way(lm, name) as switched:
                    ms, logits[name] = step_ms(switched, rows, steps)
                times[name].append(ms)
        report[f"{rows}_rows"] = {
            name: {
                "ms_median": round(statistics.median(t), 2),
                "ms": [round(x, 2) for x in t],
                "max_diff": float((logits[name] - logits["transformers"]).abs().max()),
            }
            for name, t in times.items()
        }
        print(json.dumps({f"{rows}_rows": report[f"{rows}_rows"]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"lean_decode_{report['cpu'].lower()}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
