"""No client can stall the others: huge-but-legal requests and long prompts next to running streams.

Starts the real server (bundled model, CPU) through its CLI and measures, as a client sees it:
  A. while one stream runs, a `/chat` with a 3000-round history and an OpenAI request with 6000 messages:
     /health's worst latency, the stream's worst pause, and how long each big request takes to be answered;
  B. while two streams run, one ~4000-token prompt: the streams' worst pause and the long request's time to first
     token, for each `--prefill-chunk` given (0 is the old one-piece prefill).

    .venv/bin/python bench/stall_bench.py [--chunks 0 256 512 1024]

Writes bench/results/stall_bench_<instruction set>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serve_bench import start_server  # noqa: E402

LONG_TEXT = "The lighthouse keeper counted the ships that passed the rocky cape every night. "


async def stream_times(session: aiohttp.ClientSession, base: str, tokens: int, started: asyncio.Event) -> list[float]:
    """Arrival times of a `/stream`'s delta frames."""
    body = {"query": "Tell me a long story.", "max_tokens": tokens, "ignore_eos": True, "temperature": 0}
    times: list[float] = []
    async with session.post(base + "/stream", json=body) as resp:
        async for line in resp.content:
            if line.startswith(b"data: "):
                times.append(time.perf_counter())
                started.set()
    return times


async def probe_health(session: aiohttp.ClientSession, base: str, stop: asyncio.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        start = time.perf_counter()
        async with session.get(base + "/health") as resp:
            await resp.read()
        latencies.append(time.perf_counter() - start)
        await asyncio.sleep(0.05)
    return latencies


async def timed_post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, float]:
    start = time.perf_counter()
    async with session.post(url, json=body) as resp:
        await resp.read()
        return resp.status, time.perf_counter() - start


def worst_gap(times: list[float], since: float, until: float) -> float:
    inside = [t for t in times if since <= t <= until]
    gaps = [b - a for a, b in itertools.pairwise(inside)]
    after = [t for t in times if t > until][:1]
    if inside and after:
        gaps.append(after[0] - inside[-1])
    return max(gaps, default=0.0)


async def huge_requests(base: str) -> dict[str, Any]:
    history = [[f"Question {i}: what is {i} plus {i}?", f"Answer {i}: it is {2 * i}."] for i in range(3000)]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(6000)]
    messages.append({"role": "user", "content": "and now?"})
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started, stop = asyncio.Event(), asyncio.Event()
        stream = asyncio.create_task(stream_times(session, base, 400, started))
        await started.wait()
        probe = asyncio.create_task(probe_health(session, base, stop))
        since = time.perf_counter()
        chat = await timed_post(session, base + "/chat", {"query": "hi", "history": history, "max_tokens": 16})
        openai = await timed_post(session, base + "/v1/chat/completions", {"messages": messages, "max_tokens": 16})
        until = time.perf_counter()
        stop.set()
        health = await probe
        times = await stream
    return {
        "chat_3000_rounds": {"status": chat[0], "seconds": round(chat[1], 3)},
        "openai_6000_messages": {"status": openai[0], "seconds": round(openai[1], 3)},
        "health_max_s": round(max(health), 3),
        "stream_max_pause_s": round(worst_gap(times, since, until), 3),
    }


async def long_prompt(base: str, repeats: int) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        events = [asyncio.Event(), asyncio.Event()]
        streams = [asyncio.create_task(stream_times(session, base, 300, e)) for e in events]
        for e in events:
            await e.wait()
        await asyncio.sleep(1.0)
        text = LONG_TEXT * repeats
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": 1, "stream": True}
        body["stream_options"] = {"include_usage": True}
        since = time.perf_counter()
        prompt_tokens = 0
        ttft = 0.0
        async with session.post(base + "/v1/chat/completions", json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if not ttft and chunk.get("choices") and chunk["choices"][0]["delta"].get("content") is not None:
                        ttft = time.perf_counter() - since
                    if chunk.get("usage"):
                        prompt_tokens = chunk["usage"]["prompt_tokens"]
        until = time.perf_counter()
        times = await asyncio.gather(*streams)
    return {
        "prompt_tokens": prompt_tokens,
        "long_ttft_s": round(ttft, 3),
        "streams_max_pause_s": round(max(worst_gap(t, since, until) for t in times), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, nargs="*", default=[0, 256, 512, 768])
    p.add_argument("--skip-huge", action="store_true", help="only the long-prompt runs")
    p.add_argument("--repeats", type=int, default=250, help="repeats of a 15-word sentence (250: about 4000 tokens)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--server-args", default="", help="more flags for server.py, e.g. '--prefill-seconds 1'")
    args = p.parse_args()
    extra = shlex.split(args.server_args)
    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    report: dict[str, Any] = {"command": " ".join(sys.argv), "cpu": isa}
    if not args.skip_huge:
        proc, url = start_server(["--device", "cpu", *extra])
        try:
            report["huge_requests"] = asyncio.run(huge_requests(url.removesuffix("/v1")))
            print(json.dumps(report["huge_requests"]), flush=True)
        finally:
            proc.terminate()
            proc.wait()
    report["long_prompt"] = {}
    for chunk in args.chunks:
        proc, url = start_server(["--device", "cpu", "--prefill-chunk", str(chunk), *extra])
        try:
            result = asyncio.run(long_prompt(url.removesuffix("/v1"), args.repeats))
        finally:
            proc.terminate()
            proc.wait()
        report["long_prompt"][str(chunk)] = result
        print(json.dumps({"prefill_chunk": chunk, **result}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"stall_bench_{isa.lower()}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
