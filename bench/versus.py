"""This checkout's server against another checkout's (a `git worktree` of an earlier commit), same client, same run,
alternated: one stream (5 requests) and 16 at once, 64 tokens each.

    git worktree add /tmp/before dd157b4
    .venv/bin/python bench/versus.py /tmp/before [--rounds 2] [--before-args "--dtype float32"]

`--before-args` passes flags to the other server only: under the AVX2 emulation (bench/README.md) the code at
dd157b4 read bf16 support from /proc/cpuinfo alone, so it is told `--dtype float32`, what it chose on a real AVX2
CPU. Writes bench/results/versus_<instruction set>.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from serve_bench import closed_loop, served  # noqa: E402


async def both_loads(url: str, model: str) -> dict[str, Any]:
    out = {}
    for concurrency, rounds in ((1, 5), (16, 1)):
        run = (await closed_loop(url, model, concurrency, 64, f"c={concurrency}", rounds)).summary()
        keep = ("ttft_p50_ms", "itl_p50_ms", "per_request_decode_tok_s", "aggregate_tok_s", "failed")
        out[str(concurrency)] = {k: round(v, 1) if isinstance(v, float) else v for k, v in run.items() if k in keep}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path, help="the other checkout (its server.py is run with this venv)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--before-args", default="", help="flags for the other server only")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    report: dict[str, Any] = {"command": "bench/versus.py " + " ".join(sys.argv[1:]), "cpu": isa, "runs": []}
    for _ in range(args.rounds):
        for name, root, extra in (("before", args.before, shlex.split(args.before_args)), ("now", ROOT, [])):
            command = [sys.executable, str(root / "server.py"), "--log-level", "WARNING", "--max-queue", "256"]
            result = served([], both_loads, [*command, *extra, "--port"])
            report["runs"].append({"server": name, **result})
            print(json.dumps(report["runs"][-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"versus_{isa.lower()}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
