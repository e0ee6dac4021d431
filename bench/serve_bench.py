"""Serving benchmark: the real server over HTTP next to transformers `generate` in-process, same model, same run,
and optionally next to llama.cpp's `llama-server` on the same GGUF file with the same client.

    .venv/bin/pip install -r bench/requirements.txt
    .venv/bin/python bench/serve_bench.py                 # bundled model, CPU, our defaults
    .venv/bin/python bench/serve_bench.py --against-llama-server /path/to/llama-server --quantize-sweep
    .venv/bin/python bench/serve_bench.py --url http://127.0.0.1:8000/v1 --model NAME   # any OpenAI-compatible server
    .venv/bin/python bench/serve_bench.py --closed-only --quantize-sweep --against-llama-server PATH   # the ISA table
    .venv/bin/python bench/serve_bench.py --closed-only --against-llama-server PATH --rounds 3   # alternated
    .venv/bin/python bench/serve_bench.py --closed-only --temperature 0.95 --top-p 0.7   # sampled, not greedy

It records the instruction set PyTorch dispatches to (`AVX512`, or `AVX2` on a CPU without AVX-512 or under the
emulation in bench/README.md) and writes bench/results/serve_bench_<instruction set>.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


@dataclass
class Result:
    """One streamed request, as the client saw it."""

    ttft: float  # seconds from send to first content
    itls: list[float]  # seconds between content chunks
    tokens: int  # completion tokens (from usage)
    total: float  # seconds from send to the end
    failed: bool = False  # an error status, a broken stream, or fewer tokens than asked for


@dataclass
class Run:
    name: str
    concurrency: int
    wall: float
    results: list[Result] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        done = [r for r in self.results if not r.failed]
        ttfts = [r.ttft for r in done]
        itls = [x for r in done for x in r.itls]
        per_request = [(r.tokens - 1) / (r.total - r.ttft) for r in done if r.tokens > 1 and r.total > r.ttft]
        return {
            "name": self.name,
            "concurrency": self.concurrency,
            "requests": len(self.results),
            "failed": len(self.results) - len(done),
            "ttft_p50_ms": 1000 * pct(ttfts, 50),
            "ttft_p95_ms": 1000 * pct(ttfts, 95),
            "itl_p50_ms": 1000 * pct(itls, 50),
            "itl_p95_ms": 1000 * pct(itls, 95),
            "itl_p99_ms": 1000 * pct(itls, 99),
            "itl_max_ms": 1000 * max(itls, default=0.0),
            "per_request_decode_tok_s": statistics.mean(per_request) if per_request else 0.0,
            "aggregate_tok_s": sum(r.tokens for r in self.results) / self.wall,
        }


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def client() -> aiohttp.ClientSession:
    """The benchmark's client: a new connection per request, for every server alike (llama-server, 0.3.36's
    sources, drops a request that follows a finished stream at once on the same connection; bench/multiturn.py)."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=1800), connector=aiohttp.TCPConnector(force_close=True)
    )


# how every request samples (greedy unless --temperature/--top-p say otherwise)
SAMPLING: dict[str, float] = {"temperature": 0.0}


async def one_request(session: aiohttp.ClientSession, url: str, model: str, prompt: str, tokens: int) -> Result:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "min_tokens": tokens,
        "ignore_eos": True,
        **SAMPLING,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = 0.0
    itls: list[float] = []
    count = 0
    try:
        async with session.post(url + "/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    count = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    if first == 0.0:
                        first = now
                    else:
                        itls.append(now - last)
                    last = now
    except (aiohttp.ClientError, ValueError) as exc:
        print(f"request failed: {exc!r}", file=sys.stderr)
        return Result(0.0, [], 0, time.perf_counter() - start, failed=True)
    return Result(first - start, itls, count, last - start, failed=count < tokens or first == 0.0)


async def closed_loop(url: str, model: str, concurrency: int, tokens: int, name: str, rounds: int = 1) -> Run:
    """`concurrency` identical requests at once, `rounds` times in a row."""
    async with client() as session:
        await one_request(session, url, model, PROMPT, 4)  # warm-up
        results: list[Result] = []
        start = time.perf_counter()
        for _ in range(rounds):
            results += await asyncio.gather(
                *(one_request(session, url, model, PROMPT, tokens) for _ in range(concurrency))
            )
        return Run(name, concurrency, time.perf_counter() - start, results)


# a pasted document: about 2000 tokens of the bundled model's vocabulary
DOCUMENT = "The lighthouse keeper counted the ships that passed the rocky cape every night. " * 120


async def poisson(url: str, model: str, rate: float, count: int, seed: int = 0) -> Run:
    """Requests of mixed prompt and output lengths arriving at `rate` per second; one in six pastes a long document."""
    rng = random.Random(seed)
    async with client() as session:
        tasks = []
        start = time.perf_counter()
        for _ in range(count):
            prompt = PROMPT + " Add details." * rng.randint(0, 30)
            if rng.random() < 1 / 6:
                prompt = DOCUMENT + "Summarize this."
            tasks.append(asyncio.create_task(one_request(session, url, model, prompt, rng.choice([16, 32, 64, 128]))))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return Run(f"poisson {rate}/s", count, time.perf_counter() - start, list(results))


async def late_joiner(url: str, model: str, running: int, tokens: int) -> dict[str, float]:
    """TTFT of one request sent while `running` others are decoding, and their step time."""
    async with client() as session:
        background = [asyncio.create_task(one_request(session, url, model, PROMPT, tokens * 4)) for _ in range(running)]
        await asyncio.sleep(0)
        # let all of them finish their prefill and decode for a while
        await asyncio.sleep(max(2.0, running * 0.2))
        late = await one_request(session, url, model, PROMPT, 8)
        rest = await asyncio.gather(*background)
    steps = [x for r in rest for x in r.itls]
    return {"late_ttft_ms": 1000 * late.ttft, "batch_step_p50_ms": 1000 * pct(steps, 50)}


# ---- in-process limit ---------------------------------------------------------------------------


def in_process(model_path: Path | None, device: str, tokens: int, batches: list[int]) -> dict[str, Any]:
    """transformers `generate` on the same model, dtype and weights as the server's defaults: prefill time and
    decode speed per batch size."""
    import torch

    from generation.prepare import load_model
    from models.chat_format import Message
    from models.loader import ModelConfig, default_cache_dir

    lm = load_model(ModelConfig(model_path, device, cache_dir=default_cache_dir()))
    ids = lm.chat.encode([Message("user", PROMPT)])
    out: dict[str, Any] = {"prompt_tokens": len(ids), "model": lm.name, "dtype": lm.dtype, "bits": lm.bits}
    with torch.inference_mode():
        one = torch.tensor([ids], device=lm.device)
        lm.model(one)  # warm-up
        prefills = []
        for _ in range(5):
            t = time.perf_counter()
            lm.model(one)
            prefills.append(time.perf_counter() - t)
        out["prefill_ms"] = 1000 * statistics.median(prefills)
        for b in batches:
            batch = one.repeat(b, 1)
            kwargs = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
            warm = {**kwargs, "max_new_tokens": 4, "min_new_tokens": 4}
            lm.model.generate(batch, attention_mask=torch.ones_like(batch), **warm)
            t = time.perf_counter()
            lm.model.generate(batch, attention_mask=torch.ones_like(batch), **kwargs)
            total = time.perf_counter() - t
            out[f"batch{b}"] = {
                "total_s": total,
                "aggregate_tok_s": b * tokens / total,
                "decode_tok_s_per_seq": (tokens - 1) / (total - out["prefill_ms"] / 1000),
            }
    del lm
    return out


# ---- server process ----------------------------------------------------------------------------


def start_server(args: list[str], command: list[str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Our server (or `command`, given the port as its last argument) on a free port; its /v1 URL once healthy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if command is None:
        command = [sys.executable, str(ROOT / "server.py"), "--log-level", "WARNING", *args, "--port"]
    proc = subprocess.Popen(
        [*command, str(port)], stdout=subprocess.DEVNULL, stderr=open(os.environ.get("SERVER_LOG", os.devnull), "w")
    )
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.load(r)["status"] == "ok":
                    return proc, url + "/v1"
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


def served_model(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url + "/models", timeout=10) as r:
        return str(json.load(r)["data"][0]["id"])


async def measure(url: str, model: str, args: argparse.Namespace, poisson_run: bool = True) -> list[dict[str, Any]]:
    runs = []
    for c in args.concurrency:
        # a single stream is repeated so that its percentiles mean something
        rounds = 5 if c == 1 else 1
        runs.append((await closed_loop(url, model, c, args.tokens, f"closed c={c}", rounds)).summary())
        print(json.dumps(runs[-1]), flush=True)
    if poisson_run:
        runs.append((await poisson(url, model, args.rate, args.poisson_requests)).summary())
        print(json.dumps(runs[-1]), flush=True)
    return runs


def served(args: list[str], body: Any, command: list[str] | None = None) -> Any:
    """Run `body(url, model)` against a server started for it, and stop the server after."""
    proc, url = start_server(args, command)
    try:
        return asyncio.run(body(url, served_model(url)))
    finally:
        proc.terminate()
        proc.wait()


def llama_server(path: Path, gguf: Path, slots: int) -> list[str]:
    """llama.cpp's server on the same GGUF: `slots` parallel sequences sharing a 1024-token context each."""
    return [str(path), "-m", str(gguf), "-np", str(slots), "-c", str(1024 * slots), "--host", "127.0.0.1", "--port"]


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [r for r in report["server"] if r["name"].startswith("closed")]
    xs = [r["concurrency"] for r in closed]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(xs, [r["aggregate_tok_s"] for r in closed], "o-", label="server (batched)")
    if report.get("server_batch1"):
        one = report["server_batch1"]
        a.plot([one["concurrency"]], [one["aggregate_tok_s"]], "s", label="server --max-batch-size 1")
    ip = report.get("in_process")
    if ip:
        ks = [int(k[5:]) for k in ip if k.startswith("batch")]
        a.plot(ks, [ip[f"batch{k}"]["aggregate_tok_s"] for k in ks], "x--", label="in-process generate")
    a.set(xlabel="concurrent streams", ylabel="tokens/s (aggregate)", xscale="log", title="Throughput")
    a.legend()
    b.plot(xs, [r["ttft_p50_ms"] for r in closed], "o-", label="TTFT p50")
    b.plot(xs, [r["ttft_p95_ms"] for r in closed], "o--", label="TTFT p95")
    b.set(xlabel="concurrent streams", ylabel="ms", xscale="log", title="Time to first token")
    b.legend()
    fig.suptitle(f"{report['model']} on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="benchmark this OpenAI-compatible base URL instead of starting our server")
    p.add_argument("--model", help="model name for --url (default: the first of /models)")
    p.add_argument("--model-path", type=Path, help="our server's --model (default: the bundled model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=64, help="fixed output length of closed-loop requests")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second")
    p.add_argument("--poisson-requests", type=int, default=24)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--against-llama-server", type=Path, help="also measure this llama-server binary on the same GGUF")
    p.add_argument("--quantize-sweep", action="store_true", help="also measure our server at --quantize 16, 8 and 4")
    p.add_argument("--poisson-only", action="store_true", help="only the Poisson runs, chunked prefill and whole")
    p.add_argument(
        "--closed-only", action="store_true", help="only the closed-loop runs (no Poisson, late joiner or batch 1)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --closed-only and --against-llama-server: ours and llama-server alternated this many times, each "
        "started afresh; the ratios of every round and their medians",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="every request's temperature (default: greedy)")
    p.add_argument("--top-p", type=float, help="every request's top_p (default: none sent)")
    args = p.parse_args()
    SAMPLING.update(temperature=args.temperature, **({} if args.top_p is None else {"top_p": args.top_p}))
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": " ".join(sys.argv), "device": args.device, "cpu": cpu_report()}
    isa = report["cpu"]["capability"].lower()
    print(json.dumps({"cpu": report["cpu"]}), flush=True)
    top = max(args.concurrency)

    if args.poisson_only:
        base = [*(["--model", str(args.model_path)] if args.model_path else []), "--device", args.device]

        async def mixed(url: str, model: str) -> dict[str, Any]:
            return (await poisson(url, model, args.rate, args.poisson_requests)).summary()

        report["poisson_chunked"] = served([*base, "--max-queue", "256"], mixed)
        report["poisson_prefill_whole"] = served([*base, "--max-queue", "256", "--prefill-chunk", "0"], mixed)
        print(json.dumps({k: report[k] for k in ("poisson_chunked", "poisson_prefill_whole")}, indent=1))
        (args.out / f"poisson_bench_{isa}.json").write_text(json.dumps(report, indent=1))
        return
    if args.url:
        model = args.model or served_model(args.url)
        runs = asyncio.run(measure(args.url, model, args, poisson_run=not args.closed_only))
        report.update(model=model, url=args.url, server=runs)
    else:
        report["in_process"] = in_process(args.model_path, args.device, args.tokens, sorted({1, top}))
        print(json.dumps(report["in_process"]), flush=True)
        report["model"] = report["in_process"]["model"]
        base = [*(["--model", str(args.model_path)] if args.model_path else []), "--device", args.device]

        async def defaults(url: str, model: str) -> None:
            report["server"] = await measure(url, model, args, poisson_run=not args.closed_only)
            report["health"] = health(url)
            if not args.closed_only:
                report["late_joiner"] = await late_joiner(url, model, top - 1, args.tokens)
                print(json.dumps(report["late_joiner"]), flush=True)

        if args.rounds > 1 and args.closed_only and args.against_llama_server:
            alternated(report, args, base, top, defaults)
            return
        served([*base, "--max-queue", "256"], defaults)
        print(json.dumps({"chosen": report["health"].get("kernels", {}).get("bits")}), flush=True)

        async def batch1(url: str, model: str) -> dict[str, Any]:
            return (await closed_loop(url, model, top, args.tokens, f"batch1 c={top}")).summary()

        async def poisson_only(url: str, model: str) -> dict[str, Any]:
            return (await poisson(url, model, args.rate, args.poisson_requests)).summary()

        if not args.closed_only:
            report["server_batch1"] = served([*base, "--max-batch-size", "1", "--max-queue", "256"], batch1)
            print(json.dumps(report["server_batch1"]), flush=True)
            # the Poisson run of mixed prompt lengths with whole prompts prefilled at once, as before chunked prefill
            report["poisson_prefill_whole"] = served([*base, "--prefill-chunk", "0"], poisson_only)
            print(json.dumps(report["poisson_prefill_whole"]), flush=True)
        if args.quantize_sweep:
            report["quantize"] = {}
            for bits in ("16", "8", "4"):

                async def sweep(url: str, model: str) -> list[dict[str, Any]]:
                    return await measure(url, model, args, poisson_run=False)

                report["quantize"][bits] = served([*base, "--quantize", bits, "--max-queue", "256"], sweep)
                print(json.dumps({"quantize": bits, "runs": report["quantize"][bits]}), flush=True)
        if args.against_llama_server:
            report["llama_server"] = peer_runs(args, top)
        report["ratios"] = ratios(report, top)
        print(json.dumps(report["ratios"], indent=1))
    (args.out / f"serve_bench_{isa}.json").write_text(json.dumps(report, indent=1))
    chart(report, args.out / f"serve_bench_{isa}.png")
    print(f"wrote {args.out / f'serve_bench_{isa}.json'} and {args.out / f'serve_bench_{isa}.png'}")


def peer_runs(args: argparse.Namespace, top: int) -> list[dict[str, Any]]:
    """llama-server (`--against-llama-server`) on the same GGUF, through the same runs as ours."""
    from models.loader import bundled_model_path

    gguf = args.model_path or bundled_model_path()

    async def peer(url: str, model: str) -> list[dict[str, Any]]:
        return await measure(url, model, args, poisson_run=not args.closed_only)

    result: list[dict[str, Any]] = served([], peer, llama_server(args.against_llama_server, gguf, top))
    return result


def alternated(report: dict[str, Any], args: argparse.Namespace, base: list[str], top: int, defaults: Any) -> None:
    """Ours then llama-server, `args.rounds` times: this machine's speed drifts by 15% and more within minutes, so
    one pair of runs can say either; each round's ratios, and the medians, are written."""
    rounds = []
    for i in range(args.rounds):
        served([*base, "--max-queue", "256"], defaults)
        report["llama_server"] = peer_runs(args, top)
        pair = {k: report[k] for k in ("server", "llama_server")}
        rounds.append({**pair, "ratios": ratios(report, top)})
        print(json.dumps({"round": i + 1, "ratios": rounds[-1]["ratios"]}), flush=True)
    report["rounds"] = rounds
    report["median_ratios"] = {k: statistics.median(r["ratios"][k] for r in rounds) for k in rounds[0]["ratios"]}
    print(json.dumps({"median_ratios": report["median_ratios"]}, indent=1), flush=True)
    isa = report["cpu"]["capability"].lower()
    (args.out / f"serve_bench_{isa}_rounds.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / f'serve_bench_{isa}_rounds.json'}")


def cpu_report() -> dict[str, Any]:
    """The CPU this ran on as the server sees it: the instruction set PyTorch dispatches to, and the model name."""
    import torch

    from models.devices import cpu_has_bf16, cpu_identity

    identity = cpu_identity()
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "model": identity["model"],
        "native_bf16": cpu_has_bf16(),
        "emulated": {k: v for k, v in os.environ.items() if k.endswith(("CPU_CAPABILITY", "_ISA", "_INSTRUCTIONS"))},
    }


def health(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10) as r:
        return dict(json.load(r))


def ratios(report: dict[str, Any], top: int) -> dict[str, float]:
    ip = report["in_process"]
    runs = {r["concurrency"]: r for r in report["server"] if r["name"].startswith("closed")}
    peer: dict[str, float] = {}
    if report.get("llama_server"):
        theirs = {r["concurrency"]: r for r in report["llama_server"] if r["name"].startswith("closed")}
        peer = {
            "single_stream_vs_llama_server": runs[1]["per_request_decode_tok_s"]
            / theirs[1]["per_request_decode_tok_s"],
            f"c{top}_aggregate_vs_llama_server": runs[top]["aggregate_tok_s"] / theirs[top]["aggregate_tok_s"],
            f"c{top}_ttft_p50_ms_ours": runs[top]["ttft_p50_ms"],
            f"c{top}_ttft_p50_ms_llama_server": theirs[top]["ttft_p50_ms"],
        }
    out = {
        **peer,
        "single_stream_decode_vs_in_process": runs[1]["per_request_decode_tok_s"]
        / ip["batch1"]["decode_tok_s_per_seq"],
        "single_stream_ttft_minus_prefill_ms": runs[1]["ttft_p50_ms"] - ip["prefill_ms"],
        f"c{top}_aggregate_vs_in_process_batch{top}": runs[top]["aggregate_tok_s"]
        / ip[f"batch{top}"]["aggregate_tok_s"],
    }
    if "late_joiner" in report:
        poisson_now = next(r for r in report["server"] if r["name"].startswith("poisson"))
        late = report["late_joiner"]
        out.update(
            {
                "poisson_itl_p95_ms_chunked": poisson_now["itl_p95_ms"],
                "poisson_itl_p95_ms_prefill_whole": report["poisson_prefill_whole"]["itl_p95_ms"],
                f"c{top}_batched_vs_max_batch_size_1": runs[top]["aggregate_tok_s"]
                / report["server_batch1"]["aggregate_tok_s"],
                "late_joiner_ttft_minus_prefill_in_steps": (late["late_ttft_ms"] - ip["prefill_ms"])
                / late["batch_step_p50_ms"],
            }
        )
    if "quantize" in report:  # the sweep beside the default: is the default the fastest within the noise?
        for bits, runs_at in report["quantize"].items():
            closed = {r["concurrency"]: r for r in runs_at if r["name"].startswith("closed")}
            out[f"quantize_{bits}_single_stream_vs_default"] = (
                closed[1]["per_request_decode_tok_s"] / runs[1]["per_request_decode_tok_s"]
            )
            out[f"quantize_{bits}_c{top}_vs_default"] = closed[top]["aggregate_tok_s"] / runs[top]["aggregate_tok_s"]
    return out


if __name__ == "__main__":
    main()
