"""Multi-turn benchmark: conversations that resend their whole history every round, as every chat client does; time to
first token per round, one conversation alone and several at once. Runs against any OpenAI-compatible server, so
the same client measures llama.cpp's `llama-server` too.

    .venv/bin/python bench/multiturn.py                                   # ours at its defaults, and without the cache
    .venv/bin/python bench/multiturn.py --against-llama-server PATH      # and llama-server on the same GGUF
    .venv/bin/python bench/multiturn.py --url http://127.0.0.1:8080/v1   # any OpenAI-compatible server

Each round pastes a paragraph of about 180 tokens (different in every conversation and round) and asks about it;
answers are greedy, 32 tokens. `--distinct` also measures throughput at 16 streams whose prompts share nothing (each
starts with its own system message), our server with the prefix cache and without: what the cache costs where it
cannot help. Writes bench/results/multiturn_<instruction set>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from serve_bench import closed_loop, cpu_report, served, start_server  # noqa: E402

WORDS = (
    "harbour tide lantern keeper rope gull storm cliff beacon sail anchor current salt night ship island wave "
    "morning fog signal rock shore compass chart bell oar deck mast reef pier dune wind cloud north east south "
    "west stone path river field village market bread letter window candle winter summer autumn spring"
).split()


def paragraph(conversation: int, round_: int, words: int = 130) -> str:
    """About 180 tokens of the bundled model's vocabulary, different for every conversation and round."""
    rng = random.Random(conversation * 1000 + round_)
    sentences, sentence = [], []
    for _ in range(words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randrange(8, 14):
            sentences.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        sentences.append(" ".join(sentence).capitalize() + ".")
    return " ".join(sentences)


def session_() -> aiohttp.ClientSession:
    """A client session with a new connection per request: llama-server (0.3.36's sources) exits when a request
    follows a finished stream at once on the same connection."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=3600), connector=aiohttp.TCPConnector(force_close=True)
    )


async def turn(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    messages: list[dict[str, str]],
    tokens: int,
    extra: dict[str, Any] | None = None,
) -> tuple[float, str, int]:
    """One streamed greedy answer: seconds to its first content, its text, the prompt tokens the server cached."""
    body = {
        **(extra or {}),
        "model": model,
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = 0.0
    text: list[str] = []
    cached = -1  # the server did not say
    async with session.post(url + "/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if (usage := chunk.get("usage")) and (details := usage.get("prompt_tokens_details")):
                cached = int(details.get("cached_tokens") or 0)
            if chunk.get("choices") and (piece := chunk["choices"][0]["delta"].get("content")):
                if not first:
                    first = time.perf_counter() - start
                text.append(piece)
    return first, "".join(text), cached


async def conversation(
    session: aiohttp.ClientSession, url: str, model: str, index: int, rounds: int, tokens: int
) -> list[tuple[float, int]]:
    """(time to first token, cached tokens) of each round of one conversation."""
    messages: list[dict[str, str]] = []
    out = []
    for r in range(rounds):
        messages.append({"role": "user", "content": f"{paragraph(index, r)}\n\nWhat is this paragraph about?"})
        ttft, answer, cached = await turn(session, url, model, messages, tokens)
        out.append((ttft, cached))
        messages.append({"role": "assistant", "content": answer})
    return out


async def conversations(url: str, model: str, at_once: int, rounds: int, tokens: int) -> dict[str, Any]:
    """`at_once` conversations together; per round: the median time to first token over them, cached tokens."""
    async with session_() as session:
        await turn(session, url, model, [{"role": "user", "content": "Hello"}], 4)  # warm-up
        start = time.perf_counter()
        # numbered apart from the other runs' conversations, so that no run finds another's paragraphs cached
        first = 1000 * at_once
        runs = await asyncio.gather(
            *(conversation(session, url, model, first + i, rounds, tokens) for i in range(at_once))
        )
        wall = time.perf_counter() - start
    per_round = []
    for r in range(rounds):
        ttfts = [run[r][0] for run in runs]
        per_round.append(
            {
                "ttft_p50_s": round(statistics.median(ttfts), 3),
                "ttft_max_s": round(max(ttfts), 3),
                "cached_tokens": [run[r][1] for run in runs],
            }
        )
    return {"conversations": at_once, "rounds": per_round, "wall_s": round(wall, 1)}


async def distinct(url: str, model: str, streams: int, tokens: int, waves: int) -> dict[str, Any]:
    """`streams` requests at once, `waves` times, no two prompts alike: aggregate tokens per second."""
    async with session_() as session:
        await turn(session, url, model, [{"role": "user", "content": "Hello"}], 4)
        produced, start = 0, time.perf_counter()
        for w in range(waves):
            bodies = [
                [
                    {"role": "system", "content": f"Session {w * streams + i}: {paragraph(900 + w, i, 12)}"},
                    {"role": "user", "content": "Tell me a story about the sea."},
                ]
                for i in range(streams)
            ]
            fixed = {"min_tokens": tokens, "ignore_eos": True}  # every answer its full length
            await asyncio.gather(*(turn(session, url, model, m, tokens, fixed) for m in bodies))
            produced += streams * tokens
        wall = time.perf_counter() - start
    return {"streams": streams, "waves": waves, "tok_s": round(produced / wall, 1), "wall_s": round(wall, 1)}


def llama_server(path: Path, gguf: Path, slots: int, per_slot: int) -> list[str]:
    """llama.cpp's server on the same GGUF: `slots` sequences of `per_slot` tokens; its prompt cache is on by
    default (each slot keeps its conversation)."""
    return [str(path), "-m", str(gguf), "-np", str(slots), "-c", str(per_slot * slots), "--host", "127.0.0.1", "--port"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="measure this OpenAI-compatible base URL instead of starting servers")
    p.add_argument("--model", help="model name for --url (default: the first of /models)")
    p.add_argument("--model-path", type=Path, help="our server's --model (default: the bundled model)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--at-once", type=int, nargs="+", default=[1, 8])
    p.add_argument("--against-llama-server", type=Path, help="also measure this llama-server binary on the same GGUF")
    p.add_argument("--distinct", action="store_true", help="also: 16 distinct streams, cache on and off")
    p.add_argument("--ours-only", action="store_true", help="only our server with its defaults (no cache-off run)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    report: dict[str, Any] = {"command": " ".join(sys.argv), "cpu": cpu_report()}
    print(json.dumps({"cpu": report["cpu"]}), flush=True)

    def body(url: str, model: str) -> Any:
        async def run() -> list[dict[str, Any]]:
            out = []
            for n in args.at_once:
                out.append(await conversations(url, model, n, args.rounds, args.tokens))
                print(json.dumps(out[-1]), flush=True)
            return out

        return run()

    if args.url:
        from serve_bench import served_model

        report["url"] = asyncio.run(body(args.url, args.model or served_model(args.url)))
    else:
        ours = ["--model", str(args.model_path)] if args.model_path else []
        servers: dict[str, tuple[list[str], list[str] | None]] = {"ours": (ours, None)}
        if not args.ours_only:
            servers["ours_no_prefix_cache"] = ([*ours, "--prefix-cache-mb", "0"], None)
        if args.against_llama_server:
            from models.loader import bundled_model_path

            gguf = args.model_path or bundled_model_path()
            slots = max(args.at_once)
            servers["llama_server"] = ([], llama_server(args.against_llama_server, gguf, slots, 4096))
        for name, (flags, command) in servers.items():
            print(name, flush=True)
            report[name] = served(flags, body, command)
        if args.distinct:
            for name, flags in (("distinct_cache_on", ours), ("distinct_cache_off", [*ours, "--prefix-cache-mb", "0"])):
                proc, url = start_server(flags)
                try:
                    from serve_bench import served_model

                    model = served_model(url)
                    asyncio.run(closed_loop(url, model, 4, 8, "warm-up"))
                    report[name] = asyncio.run(distinct(url, model, 16, 64, 3))
                    print(name, json.dumps(report[name]), flush=True)
                finally:
                    proc.terminate()
                    proc.wait()
    isa = report["cpu"]["capability"].lower()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"multiturn_{isa}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
