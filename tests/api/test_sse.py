"""Exact bytes on the wire from sse.py."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from sse import EventStream, format_event


@pytest.mark.parametrize(
    ("data", "event", "expected"),
    [
        ('{"delta":"你好"}', "delta", b'event: delta\ndata: {"delta":"\xe4\xbd\xa0\xe5\xa5\xbd"}\n\n'),
        ("[DONE]", None, b"data: [DONE]\n\n"),
        ("line1\nline2", None, b"data: line1\ndata: line2\n\n"),
        ("a\r\nb\rc", None, b"data: a\ndata: b\ndata: c\n\n"),
        ("x", "bad\nname", b"event: badname\ndata: x\n\n"),
    ],
    ids=["json-utf8", "no-event", "multiline", "crlf", "newline-in-event"],
)
def test_format_event(data: str, event: str | None, expected: bytes) -> None:
    assert format_event(data, event) == expected


async def test_event_stream_frames_and_headers(aiohttp_client: Any) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        out = EventStream()
        await out.prepare(request)
        await out.send_json({"delta": "é😀", "finished": False}, "delta")
        await out.ping()
        await out.send("[DONE]")
        await out.close()
        return out.response

    app = web.Application()
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    body = await resp.read()
    assert body == (
        'event: delta\ndata: {"delta":"é😀","finished":false}\n\n'.encode() + b": ping\n\n" + b"data: [DONE]\n\n"
    )
