"""What picking one token costs: `generation.sampling.sample` on one row of logits the size of the bundled model's
vocabulary (49,152), under the sampling defaults of each door and two harder cases, µs a call (median of rounds).

    .venv/bin/python bench/sampling_bench.py [--rounds 5]

Against a decode step of 15 ms at one row (bench/README.md), a millisecond here is a fifteenth of a stream's speed,
and a batch pays it once per row. Prints one JSON line per case; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generation.sampling import History, SamplingParams, sample  # noqa: E402

VOCAB = 49152
CASES = {
    "greedy": SamplingParams(temperature=0),
    "greedy, ignore_eos": SamplingParams(temperature=0, ignore_eos=True),
    "OpenAI defaults (1.0, top_p 1)": SamplingParams(temperature=1.0),
    "ChatGLM defaults (0.95, top_p 0.7)": SamplingParams(temperature=0.95, top_p=0.7),
    "Ollama defaults (0.8, top_p 0.9, top_k 40)": SamplingParams(temperature=0.8, top_p=0.9, top_k=40),
    "flat (1.5, top_p 0.99): the nucleus past 4096 tokens": SamplingParams(temperature=1.5, top_p=0.99),
}


def us_per_call(f: Callable[[], object], calls: int = 300) -> float:
    for _ in range(20):
        f()
    start = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # logits spread like a small model's: a few likely tokens, a long tail
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    history = History.of(list(range(50)), VOCAB, torch.Generator().manual_seed(0), torch.device("cpu"))
    eos = frozenset({2})
    print(json.dumps({"cpu": torch.backends.cpu.get_cpu_capability(), "threads": args.threads}))
    times: dict[str, list[float]] = {name: [] for name in CASES}

    def one(params: SamplingParams) -> Callable[[], object]:
        return lambda: sample(logits, params, history, eos)

    for _ in range(args.rounds):
        for name, params in CASES.items():
            times[name].append(us_per_call(one(params)))
    for name, t in times.items():
        print(json.dumps({"case": name, "us_median": round(statistics.median(t), 1), "us": [round(x, 1) for x in t]}))


if __name__ == "__main__":
    main()
