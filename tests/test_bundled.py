"""End to end on the bundled SmolLM2-135M-Instruct, served by `python server.py` as a user starts it."""

from __future__ import annotations

import json
import re
import urllib.request

from tests.conftest import LiveServer
from tests.helpers import parse_frames

CJK_OR_EMOJI = re.compile(r"[\u4e00-\u9fff\U0001F300-\U0001FAFF]")


def test_bundled_model_knows_paris(bundled_server: LiveServer) -> None:
    body = bundled_server.post("/chat", {"query": "What is the capital of France?", "temperature": 0})
    assert "Paris" in body["response"]
    assert body["finish_reason"] == "stop"


def stream(server: LiveServer, body: dict[str, object]) -> list[dict[str, object]]:
    req = urllib.request.Request(server.url + "/stream", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        return [json.loads(data) for _, data in parse_frames(r.read())]


def test_sampled_chinese_and_emoji_stream_cleanly(bundled_server: LiveServer) -> None:
    seen_multibyte = False
    for seed in range(3):
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


def test_greedy_answers_do_not_depend_on_batching(bundled_server: LiveServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    queries = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain.", "Say hi."]
    bodies = [{"query": q, "temperature": 0, "max_tokens": 24} for q in queries]
    alone = [bundled_server.post("/chat", b)["response"] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(bundled_server.post, "/chat", b) for b in bodies]
        peak = 0
        while not all(f.done() for f in futures):
            peak = max(peak, bundled_server.get("/health")["running"])
        together = [f.result()["response"] for f in futures]
    assert together == alone
    assert peak >= 2  # they were decoded together, not one after another
