"""End to end on the bundled SmolLM2-135M-Instruct, served by `python server.py` as a user starts it."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from typing import Any

from api.config import BACKEND
from models.loader import LoadedModel
from tests.conftest import ROOT, LiveServer, MakeClient
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


# schemas of bench/schemas.json whose greedy answers finished in bench/structured_bench.py's runs when prefilled
# with nothing cached (below), on AVX-512 and on AVX2, with the loop guard off; on the others the 135M model can
# repeat inside an unbounded array or string until max_tokens ("length"; bench/README.md).
FINISHING = {"person_flat", "weather_report", "sentiment", "nullable_names", "emoji_reaction"}
# schemas whose greedy answers loop until max_tokens 400 with the guard off, on AVX-512 and AVX2, and end valid with
# the default guard on both (counting vertices `{"x":1,"y":1},{"x":2,"y":2},…`; bench/README.md)
LOOPING = {"polygon_refs"}
SCHEMAS = json.loads((ROOT / "bench" / "schemas.json").read_text())
SCHEMA_SET = [e for e in SCHEMAS if e["name"] in FINISHING]


def test_the_sdks_parse_gets_valid_objects_from_the_bundled_model(bundled_server: LiveServer) -> None:
    """The official SDK's structured output against the real small model: without the constraint it rarely
    writes valid JSON for a schema; with it, always. (The whole schema set, sampled, batched and streamed:
    bench/structured_bench.py.)"""
    import jsonschema
    import openai
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int
        email: str

    client = openai.OpenAI(base_url=bundled_server.url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    bundled_server.post("/clear", {})  # nothing cached (below)
    parsed = client.beta.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Give me a person as JSON: their name, age and email address."}],
        response_format=Person,
        temperature=0,
        max_tokens=200,
    )
    assert parsed.choices[0].finish_reason == "stop"
    assert isinstance(parsed.choices[0].message.parsed, Person)
    for entry in SCHEMA_SET:  # greedy, streamed and not
        for stream in (False, True):
            request: dict[str, Any] = {
                "model": model,
                "messages": [{"role": "user", "content": entry["prompt"]}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": entry["schema"]}},
                "temperature": 0,
                "max_tokens": 400,
            }
            # each request prefilled whole, with nothing cached: in bf16 a prompt prefilled after cached blocks gets
            # logits a few tenths apart, enough to change a 135M model's greedy path (it loops on some schemas)
            bundled_server.post("/clear", {})
            if stream:
                text, reason = "", None
                for chunk in client.chat.completions.create(**request, stream=True):
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                        reason = chunk.choices[0].finish_reason or reason
            else:
                done = client.chat.completions.create(**request)
                text, reason = done.choices[0].message.content or "", done.choices[0].finish_reason
            assert reason == "stop", (entry["name"], text)
            jsonschema.validate(json.loads(text), entry["schema"])


def test_the_default_loop_guard_lets_the_bundled_model_finish_its_loops(bundled_server: LiveServer) -> None:
    """Answers the 135M model writes in circles until `max_tokens` end valid with `stop`, after at least half their
    budget (the guard acts only from there)."""
    import jsonschema

    model = bundled_server.get("/v1/models")["data"][0]["id"]
    for entry in (e for e in SCHEMAS if e["name"] in LOOPING):
        bundled_server.post("/clear", {})  # nothing cached, as the greedy paths above were measured
        request = {
            "model": model,
            "messages": [{"role": "user", "content": entry["prompt"]}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": entry["schema"]}},
            "temperature": 0,
            "max_tokens": 400,
        }
        done = bundled_server.post("/v1/chat/completions", request)
        text = done["choices"][0]["message"]["content"]
        assert done["choices"][0]["finish_reason"] == "stop", (entry["name"], text)
        jsonschema.validate(json.loads(text), entry["schema"])
        assert done["usage"]["completion_tokens"] >= 200, (entry["name"], text)
