"""The Anthropic and Ollama doors over what an upstream may stream that a local model never does: a call's
arguments in pieces, interleaved with another call and with text, and arguments that are not a JSON object. Their
clients must still get a well-formed answer: Anthropic's blocks each started, filled and stopped once, in order;
Ollama's arguments an object."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import ollama

from tests.backends.test_upstream import USAGE, FakeUpstream, delta_chunk, fake_proxy, piece
from tests.helpers import parse_frames

# two calls whose pieces interleave, then text after them: the stream a door must still answer in order
INTERLEAVED = [
    delta_chunk({"role": "assistant", "content": "Let me look. "}),
    delta_chunk({"tool_calls": [piece(0, '{"city": ', id="call_a", name="get_weather")]}),
    delta_chunk({"tool_calls": [piece(1, "", id="call_b", name="get_time")]}),
    delta_chunk({"tool_calls": [piece(0, '"Paris"}')]}),  # the first call goes on after the second began
    delta_chunk({"tool_calls": [piece(1, "{}")]}),
    delta_chunk({"content": "Done."}),
    delta_chunk({}, "tool_calls"),
    USAGE,
    b"data: [DONE]",
]
ASK = {"model": "any", "max_tokens": 50, "messages": [{"role": "user", "content": "Weather and time?"}]}
TOOLS = [
    {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
    {"name": "get_time", "input_schema": {"type": "object"}},
]


async def test_interleaved_call_pieces_reach_anthropic_clients_as_whole_blocks_in_order(aiohttp_client: Any) -> None:
    proxy = await fake_proxy(aiohttp_client, FakeUpstream(INTERLEAVED))
    whole = await (await proxy.post("/v1/messages", json={**ASK, "tools": TOOLS})).json()
    assert [b["type"] for b in whole["content"]] == ["text", "tool_use", "tool_use"]
    assert whole["content"][0]["text"] == "Let me look. Done."
    assert [(b["name"], b["input"]) for b in whole["content"][1:]] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert whole["stop_reason"] == "tool_use"

    proxy = await fake_proxy(aiohttp_client, FakeUpstream(INTERLEAVED))
    raw = await (await proxy.post("/v1/messages", json={**ASK, "tools": TOOLS, "stream": True})).read()
    events = [(name, json.loads(data)) for name, data in parse_frames(raw)]
    open_block: int | None = None
    seen: list[int] = []
    for name, data in events:
        if name == "content_block_start":
            assert open_block is None, "a block started before the last one stopped"
            open_block = data["index"]
            seen.append(open_block)
        elif name == "content_block_delta":
            assert data["index"] == open_block, "a delta for a block that is not open"
        elif name == "content_block_stop":
            assert data["index"] == open_block
            open_block = None
    assert seen == [0, 1, 2] and open_block is None

    # the SDK reads the same stream into the same message
    message = anthropic.types.Message.model_validate(whole)
    assert message.content[1].type == "tool_use"


async def test_arguments_that_are_not_an_object_reach_ollama_clients_as_an_object(aiohttp_client: Any) -> None:
    broken = [
        delta_chunk({"tool_calls": [piece(0, "[1, 2]", id="call_a", name="get_weather")]}),
        delta_chunk({}, "tool_calls"),
        b"data: [DONE]",
    ]
    proxy = await fake_proxy(aiohttp_client, FakeUpstream(broken))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "tools": tools, "stream": False}
    answer = await (await proxy.post("/api/chat", json=body)).json()
    reply = ollama.ChatResponse.model_validate(answer)  # as the official client reads it
    assert reply.message.tool_calls is not None
    assert [(c.function.name, dict(c.function.arguments)) for c in reply.message.tool_calls] == [("get_weather", {})]
