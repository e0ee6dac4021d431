from __future__ import annotations
import json
from typing import Any
from tests.conftest import MakeClient

PROMPTS = ["Tell me a story", "Numbers: 1 2 3", "Tell me a long story", "Tell me a story about the sea", "Count: 1 2 3 4", "Numbers: 4 5 6", "Emoji: 👍", "Tell me a joke", "story", "Once upon a time"]

async def test_explore(make_client: MakeClient) -> None:
    client = await make_client(served_model_names=("tiny",))
    for p in PROMPTS:
        m = [{"role": "user", "content": p}]
        r = await (await client.post("/v1/chat/completions", json={"model": "tiny", "messages": m, "temperature": 0, "max_tokens": 220})).json()
        lc = await (await client.post("/v1/completions", json={"model": "tiny", "prompt": p, "temperature": 0, "max_tokens": 220})).json()
        print(repr(p), r["choices"][0]["finish_reason"], r["usage"], lc["choices"][0]["finish_reason"], lc["usage"])
