"""The CPU measurements behind three design choices, on the bundled model (each in one process, A and B alternated):

  threads    one int4 matmul from the thread that ran torch first against from a second thread (why only the
             engine's worker thread runs torch);
  attention  PyTorch's SDPA per layer in bf16 against float32, and a whole decode step with bf16 SDPA against the
             float32 cache and attention of `generation/attention.py`;
  prefill    a 2048-token prompt in 256-token chunks with the quantized layers' dense path for many rows and
             without it (`quantize.DENSE_ROWS`), at 16, 8 and 4 bits.

    .venv/bin/python bench/cpu_kernels.py [--only threads attention prefill]

Writes bench/results/cpu_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generation import batch  # noqa: E402
from generation.attention import FP32_SDPA  # noqa: E402
from generation.prepare import load_model  # noqa: E402
from models import quantize  # noqa: E402
from models.loader import LoadedModel, ModelConfig, bundled_model_path  # noqa: E402


def per_call_us(f: Callable[[], Any], n: int) -> float:
    for _ in range(max(3, n // 10)):
        f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return round((time.perf_counter() - start) / n * 1e6, 1)


def threads() -> dict[str, float]:
    """In a fresh process: the main thread runs torch first, then a second thread runs the same matmul."""
    u = torch.randint(0, 16, (1536, 576), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    sz = torch.randn(576 // 32, 1536, 2).to(torch.bfloat16)
    x = torch.randn(1, 576).to(torch.bfloat16)
    out: dict[str, float] = {}

    def run(name: str) -> None:
        out[name] = per_call_us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz), 1000)

    run("int4_matmul_us_first_thread")
    second = threading.Thread(target=run, args=("int4_matmul_us_second_thread",))
    second.start()
    second.join()
    return out


def decode_ms(lm: LoadedModel, fp32: bool, rows: int, length: int, steps: int = 20) -> float:
    object.__setattr__(lm, "fp32_attention", fp32)  # the loader's choice, switched for the comparison
    lm.model.set_attn_implementation(FP32_SDPA if fp32 else "sdpa")
    with torch.inference_mode():
        kv = batch.KVBatch()
        for r in range(rows):
            _, cache = batch.prefill_chunk(lm, list(range(100 + r, 100 + r + length)), None)
            kv.add(cache, torch.ones(1, length, dtype=torch.long))
        for _ in range(3):
            batch.decode_step(lm, kv, [5] * rows)
        start = time.perf_counter()
        for _ in range(steps):
            batch.decode_step(lm, kv, [5] * rows)
    return round((time.perf_counter() - start) / steps * 1000, 1)


def attention(lm: LoadedModel) -> dict[str, Any]:
    layers: dict[str, float] = {}
    for rows, length in ((1, 256), (16, 256)):
        q = torch.randn(rows, 9, 1, 64)
        k, v = torch.randn(rows, 3, length, 64), torch.randn(rows, 3, length, 64)
        for dtype in (torch.bfloat16, torch.float32):
            key = f"sdpa_us_{rows}_rows_{length}_tokens_{str(dtype).split('.')[-1]}"
            layers[key] = per_call_us(
                partial(F.scaled_dot_product_attention, q.to(dtype), k.to(dtype), v.to(dtype), enable_gqa=True), 200
            )
    steps: dict[str, list[float]] = {}
    for rows, length in ((1, 100), (1, 1000), (16, 100), (16, 500)):
        for _ in range(2):
            for fp32 in (False, True):
                name = f"decode_ms_{rows}_rows_{length}_tokens_{'fp32_attention' if fp32 else 'bf16_sdpa'}"
                steps.setdefault(name, []).append(decode_ms(lm, fp32, rows, length))
    decode_ms(lm, True, 1, 8)  # leave the model as the loader left it
    return {"sdpa_per_layer": layers, "decode_step": steps}


def prefill(bits: int) -> dict[str, float]:
    lm = load_model(ModelConfig(path=bundled_model_path(), quantize=bits))
    ids = torch.randint(100, 40000, (2048,), generator=torch.Generator().manual_seed(0)).tolist()
    out: dict[str, float] = {}
    with torch.inference_mode():
        batch.prefill_chunk(lm, ids[:64], None)
        for name, rows in (("dense_from_128_rows", 128), ("kernels_only", 1 << 30)):
            quantize.DENSE_ROWS = rows
            start, cache = time.perf_counter(), None
            for i in range(0, len(ids), 256):
                _, cache = batch.prefill_chunk(lm, ids[i : i + 256], cache)
            out[f"prefill_2048_s_{name}"] = round(time.perf_counter() - start, 2)
    quantize.DENSE_ROWS = 128
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=["threads", "attention", "prefill"])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    parts = args.only or ["threads", "attention", "prefill"]
    results: dict[str, Any] = {"command": "bench/cpu_kernels.py " + " ".join(sys.argv[1:])}
    # everything on the main thread, the threads comparison last: a second thread running torch slows the rest
    if "attention" in parts:
        results["attention"] = attention(load_model(ModelConfig(path=bundled_model_path())))
        print(json.dumps(results["attention"]), flush=True)
    if "prefill" in parts:
        results["prefill"] = {str(bits): prefill(bits) for bits in (16, 8, 4)}
        print(json.dumps(results["prefill"]), flush=True)
    if "threads" in parts:
        results["threads"] = threads()
        print(json.dumps(results["threads"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_kernels.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out / 'cpu_kernels.json'}")


if __name__ == "__main__":
    main()
