"""One stream on a busy machine: tokens/s of one streamed request on a quiet machine and beside one busy process (a
single-core busy loop, as a build or a browser tab makes), for our server at its defaults (the thread count measured
while serving), our server with the thread count fixed at every core (what it did before), and optionally
llama.cpp's `llama-server` on the same GGUF. Each: two requests quiet, then the busy loop starts, one request while
it settles in (reported, not counted), two requests busy; the ratio busy/quiet is what the README quotes.

    .venv/bin/python bench/busy_bench.py [--against-llama-server PATH] [--tokens 128]

Writes bench/results/busy_bench_<instruction set>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from serve_bench import PROMPT, Result, client, llama_server, one_request, served  # noqa: E402


def rate(result: Result) -> float:
    """Decode tokens/s of one request: tokens after the first over the time after the first (nan if it failed:
    llama-server drops a connection now and then)."""
    if result.failed or result.total <= result.ttft:
        return math.nan
    return (result.tokens - 1) / (result.total - result.ttft)


async def quiet_then_busy(url: str, model: str, tokens: int, busy: int) -> dict[str, Any]:
    async with client() as session:
        await one_request(session, url, model, PROMPT, 8)  # warm-up
        quiet = [rate(await one_request(session, url, model, PROMPT, tokens)) for _ in range(2)]
        loops = [await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass") for _ in range(busy)]
        try:
            await asyncio.sleep(0.5)
            settling = rate(await one_request(session, url, model, PROMPT, tokens))
            loaded = [rate(await one_request(session, url, model, PROMPT, tokens)) for _ in range(2)]
        finally:
            for loop in loops:
                loop.kill()
                await loop.wait()
    return {
        "quiet_tok_s": [shown(x) for x in quiet],
        "settling_tok_s": shown(settling),
        "busy_tok_s": [shown(x) for x in loaded],
        "busy_over_quiet": shown(mean(loaded) / mean(quiet), 2),
    }


def shown(x: float, digits: int = 1) -> float | None:
    return None if math.isnan(x) else round(x, digits)


def mean(rates: list[float]) -> float:
    done = [r for r in rates if not math.isnan(r)]
    return statistics.mean(done) if done else math.nan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--busy", type=int, default=1, help="busy loops (processes, one core each)")
    p.add_argument("--against-llama-server", type=Path, help="also measure this llama-server binary")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    import torch

    from models.loader import bundled_model_path

    cores = os.cpu_count() or 1
    report: dict[str, Any] = {
        "command": "bench/busy_bench.py " + " ".join(sys.argv[1:]),
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "cores": cores,
    }

    async def body(url: str, model: str) -> dict[str, Any]:
        return await quiet_then_busy(url, model, args.tokens, args.busy)

    report["ours_defaults"] = served([], body)
    print(json.dumps({"ours_defaults": report["ours_defaults"]}), flush=True)
    report[f"ours_threads_{cores}"] = served(["--threads", str(cores)], body)
    print(json.dumps({f"ours_threads_{cores}": report[f"ours_threads_{cores}"]}), flush=True)
    if args.against_llama_server:
        command = llama_server(args.against_llama_server, bundled_model_path(), 1)
        report["llama_server"] = served([], body, command)
        print(json.dumps({"llama_server": report["llama_server"]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"busy_bench_{report['cpu'].lower()}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
