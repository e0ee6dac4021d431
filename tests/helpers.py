"""Parsing what the server sends, strictly: a malformed frame fails the test."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def parse_frames(body: bytes) -> list[tuple[str | None, str]]:
    """Split an event stream into (event, data) frames; comments are dropped, anything else is an error."""
    text = body.decode("utf-8")
    assert text.endswith("\n\n"), "stream must end with a complete frame"
    frames = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        if all(line.startswith(":") for line in lines):
            continue
        event = None
        if lines[0].startswith("event: "):
            event = lines.pop(0)[len("event: ") :]
        assert len(lines) == 1 and lines[0].startswith("data: "), f"bad frame {block!r}"
        frames.append((event, lines[0][len("data: ") :]))
    return frames


def completion_chunks(body: bytes) -> list[dict[str, Any]]:
    """The chunks of an OpenAI stream, which must end with `[DONE]` and hold no error."""
    frames = parse_frames(body)
    assert frames[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in frames[:-1]]
    assert all("error" not in c for c in chunks), chunks
    return chunks


def chunk_deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The delta of each chunk that has a choice (the usage chunk has none)."""
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


def delta_frames(body: bytes) -> list[dict[str, Any]]:
    """The JSON of every `event: delta` frame of a ChatGLM stream."""
    frames = parse_frames(body)
    assert all(event == "delta" for event, _ in frames)
    return [json.loads(data) for _, data in frames]


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> float:
    """Poll a cheap condition; return the seconds it took, fail after `within` seconds."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < within, "condition not reached in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def chromium_or_skip() -> str:
    """Debian's chromium for the browser tests: skips the calling module where it is missing, except in CI."""
    import os
    import shutil

    import pytest

    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI needs Debian's chromium for the browser tests (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)
    return chromium


async def fuzz(
    client: Any, route: str, bodies: st.SearchStrategy[Any], refused: Callable[[int, Any], None], examples: int = 60
) -> None:
    """POST `examples` bodies drawn from `bodies` (the same ones every run) to `route`: none may cause a 5xx, and each
    4xx answer is checked by `refused(status, its JSON)` (the door's error shape); an accepted body is read whole."""
    drawn: list[Any] = []

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(bodies)
    def collect(body: Any) -> None:
        drawn.append(body)

    collect()
    for body in drawn:
        resp = await asyncio.wait_for(
            client.post(route, data=json.dumps(body), headers={"Content-Type": "application/json"}), 60
        )
        assert resp.status < 500, (body, await resp.text())
        if resp.status >= 400:
            refused(resp.status, await resp.json())
        else:
            await resp.read()
