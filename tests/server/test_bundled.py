"""End to end on the bundled SmolLM2-135M-Instruct, served by `python server.py` as a user starts it."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request

from api.config import BACKEND
from models.loader import LoadedModel
from tests.conftest import LiveServer, MakeClient
from tests.helpers import parse_frames

JSON = {"Content-Type": "application/json"}

CJK_OR_EMOJI = re.compile(r"[\u4e00-\u9fff\U0001F300-\U0001FAFF]")


def test_bundled_model_knows_paris(bundled_server: LiveServer) -> None:
    body = bundled_server.post("/chat", {"query": "What is the capital of France?", "temperature": 0})
    assert "Paris" in body["response"]
    assert body["finish_reason"] == "stop"


def stream(server: LiveServer, body: dict[str, object]) -> list[dict[str, object]]:
    req = urllib.request.Request(server.url + "/stream", data=json.dumps(body).encode(), method="POST", headers=JSON)
    with urllib.request.urlopen(req, timeout=120) as r:
        return [json.loads(data) for _, data in parse_frames(r.read())]


def test_sampled_chinese_and_emoji_stream_cleanly(bundled_server: LiveServer) -> None:
    seen_multibyte = False
    for seed in range(6):
        frames = stream(
            bundled_server,
            {"query": "用中文说你好，加一个表情", "temperature": 0.8, "top_p": 0.95, "seed": seed, "max_tokens": 40},
        )
        deltas = [str(f["delta"]) for f in frames]
        assert "".join(deltas) == frames[-1]["response"]
        assert not any("\ufffd" in d for d in deltas)
        seen_multibyte |= bool(CJK_OR_EMOJI.search(str(frames[-1]["response"])))
    assert seen_multibyte, "the prompt no longer produces Chinese or emoji; the test checks nothing"


def test_history_reaches_the_model(bundled_server: LiveServer) -> None:
    history = [["Hi, my name is Ada.", "Nice to meet you, Ada!"]]
    alone = bundled_server.post("/chat", {"query": "Repeat my name.", "temperature": 0, "max_tokens": 30})
    remembered = bundled_server.post(
        "/chat", {"query": "Repeat my name.", "history": history, "temperature": 0, "max_tokens": 30}
    )
    assert "Ada" not in alone["response"]
    assert "Ada" in remembered["response"]
    assert remembered["history"] == [*history, ["Repeat my name.", remembered["response"]]]


async def test_greedy_answers_do_not_depend_on_batching(bundled_fp32: LoadedModel, make_client: MakeClient) -> None:
    """In float32 a request's answer is the same alone and decoded beside others (bf16 may round a padded batch
    differently, see the README), checked on the real model with prompts of different lengths."""
    client = await make_client(bundled_fp32)
    queries = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain.", "Say hi."]
    bodies = [{"query": q, "temperature": 0, "max_tokens": 24} for q in queries]

    async def answer(body: dict[str, object]) -> str:
        return str((await (await client.post("/chat", json=body)).json())["response"])

    alone = [await answer(b) for b in bodies]
    engine = client.app[BACKEND]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, engine.counts[0])
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    together = await asyncio.gather(*(answer(b) for b in bodies))
    watcher.cancel()
    assert together == alone
    assert peak >= 2  # they were decoded together, not one after another
