"""Structured output on the real server over HTTP: how often answers are valid for a fixed schema set, what a
constrained row costs per token beside free ones, and the first-token delay of a schema never seen before.

    .venv/bin/pip install -r bench/requirements.txt
    .venv/bin/python bench/structured_bench.py                       # starts the bundled model's server
    .venv/bin/python bench/structured_bench.py --url http://127.0.0.1:8800/v1   # a server already running

Validity: every schema of bench/schemas.json, greedy and at temperature 0.7, streamed and not, one request at a
time and eight at once (one batch); each answer parsed and checked with `jsonschema`. Overhead: the time between
tokens of a stream held inside a JSON string (constrained) against a free stream of the same length (`ignore_eos`),
alone and 16 at once (8 constrained, 8 free) against 16 free; rounds alternate, medians reported. Writes
bench/results/structured_bench.json (or `--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from serve_bench import served_model, start_server  # noqa: E402

SCHEMAS = json.loads((ROOT / "bench" / "schemas.json").read_text())
LONG_STRING: dict[str, Any] = {
    "type": "object",
    "properties": {"story": {"type": "string"}},
    "required": ["story"],
    "additionalProperties": False,
}


def body(model: str, prompt: str, schema: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}
    if schema is not None:
        request["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    return request


async def ask(session: aiohttp.ClientSession, url: str, request: dict[str, Any]) -> dict[str, Any]:
    """One request; its text, finish reason, and for a stream the arrival time of each content chunk."""
    sent = time.perf_counter()
    async with session.post(url + "/chat/completions", json=request) as resp:
        if not request.get("stream"):
            answer = await resp.json()
            if resp.status != 200:
                return {"error": answer, "text": "", "reason": None, "times": []}
            choice = answer["choices"][0]
            return {"text": choice["message"]["content"], "reason": choice["finish_reason"], "times": [], "sent": sent}
        text, reason, times = "", None, list[float]()
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"], "text": text, "reason": None, "times": times}
            for choice in chunk["choices"]:
                if content := choice["delta"].get("content"):
                    text += content
                    times.append(time.perf_counter())
                reason = choice.get("finish_reason") or reason
        return {"text": text, "reason": reason, "times": times, "sent": sent}


def valid(entry: dict[str, Any], result: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(result["text"]), entry["schema"])
    except (ValueError, jsonschema.ValidationError):
        return False
    return bool(result["reason"] == "stop")


async def validity(url: str, model: str, max_tokens: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    failures: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for temperature in (0.0, 0.7):
            for stream in (False, True):
                for together in (1, 8):
                    ok = 0
                    for start in range(0, len(SCHEMAS), together):
                        group = SCHEMAS[start : start + together]
                        requests = [
                            body(
                                model,
                                e["prompt"],
                                e["schema"],
                                temperature=temperature,
                                stream=stream,
                                max_tokens=max_tokens,
                                seed=i,
                            )
                            for i, e in enumerate(group)
                        ]
                        results = await asyncio.gather(*(ask(session, url, r) for r in requests))
                        for entry, result in zip(group, results, strict=True):
                            if valid(entry, result):
                                ok += 1
                            else:
                                failures.append(
                                    {
                                        "schema": entry["name"],
                                        "temperature": temperature,
                                        "stream": stream,
                                        "together": together,
                                        **result,
                                    }
                                )
                    key = f"t={temperature} stream={stream} together={together}"
                    rows[key] = f"{ok}/{len(SCHEMAS)}"
                    print(key, rows[key], flush=True)
    return {"valid": rows, "failures": failures}


def gaps(result: dict[str, Any]) -> list[float]:
    times = result["times"]
    return [b - a for a, b in itertools.pairwise(times)]


async def overhead(url: str, model: str, tokens: int, rounds: int) -> dict[str, Any]:
    """Median time between tokens, constrained against free, at 1 and 16 streams."""
    prompt = "Write a long story about a lighthouse keeper."
    free = body(model, prompt, None, stream=True, max_tokens=tokens, ignore_eos=True, temperature=0.7)
    held = body(model, prompt, LONG_STRING, stream=True, max_tokens=tokens, ignore_eos=True, temperature=0.7)
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        for batch in (1, 16):
            measured: dict[str, list[float]] = {"free": [], "constrained": [], "free beside constrained": []}
            for _ in range(rounds):
                for name in ("free", "constrained"):
                    if batch == 1:
                        requests = [held if name == "constrained" else free]
                    else:
                        requests = [free] * batch if name == "free" else [held, free] * (batch // 2)
                    results = await asyncio.gather(*(ask(session, url, r) for r in requests))
                    for result, request in zip(results, requests, strict=True):
                        if name == "free":
                            measured["free"] += gaps(result)
                        elif request is held:
                            measured["constrained"] += gaps(result)
                        else:  # the free rows of the mixed batch: they pay for their neighbours' masks too
                            measured["free beside constrained"] += gaps(result)
            row: dict[str, Any] = {k: round(statistics.median(v) * 1000, 2) for k, v in measured.items() if v}
            row["overhead"] = f"{(row['constrained'] / row['free'] - 1) * 100:+.1f}%"
            out[f"batch {batch} (ms per token)"] = row
            print(f"batch {batch}", row, flush=True)
        # a schema never seen before: compiled before the first token; then the same schema again, from the cache
        fresh = {
            **LONG_STRING,
            "properties": {**LONG_STRING["properties"], f"k{uuid.uuid4().hex[:8]}": {"type": "string"}},
        }
        first_token: dict[str, float] = {}
        for name in ("new schema", "cached schema"):
            request = body(model, prompt, fresh, stream=True, max_tokens=4, temperature=0.0)
            result = await ask(session, url, request)
            first_token[name] = round((result["times"][0] - result["sent"]) * 1000, 1) if result["times"] else -1.0
        out["first_token_ms"] = first_token
        print("first token", first_token, flush=True)
    return out


async def main_async(url: str, args: argparse.Namespace) -> dict[str, Any]:
    model = served_model(url)
    report: dict[str, Any] = {"model": model}
    if not args.overhead_only:
        report["validity"] = await validity(url, model, args.max_tokens)
    if not args.validity_only:
        report["overhead"] = await overhead(url, model, args.tokens, args.rounds)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an OpenAI-compatible base URL (ending in /v1); default: start the bundled model")
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--tokens", type=int, default=96, help="tokens per stream in the overhead runs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--validity-only", action="store_true")
    p.add_argument("--overhead-only", action="store_true")
    p.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "structured_bench.json", help="the report's file"
    )
    args = p.parse_args()
    if args.url:
        report = asyncio.run(main_async(args.url, args))
    else:
        proc, url = start_server(["--device", "cpu"])
        try:
            report = asyncio.run(main_async(url, args))
        finally:
            proc.terminate()
            proc.wait(30)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
