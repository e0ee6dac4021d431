"""Hand-written server-sent events on aiohttp's StreamResponse."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    # nginx buffers proxied responses unless told not to
    "X-Accel-Buffering": "no",
}
PING = b": ping\n\n"


class ClientGone(Exception):
    """The client closed the connection; stop producing for it."""


def dumps(obj: Any) -> str:
    """Compact JSON on one line, not ASCII-escaped (Chinese stays readable on the wire)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def format_event(data: str, event: str | None = None) -> bytes:
    """One SSE frame: optional `event:` line, one `data:` line per line of data, blank line."""
    lines = []
    if event is not None:
        # a newline inside the name would start a new field
        lines.append("event: " + event.replace("\r", "").replace("\n", ""))
    lines.extend("data: " + line for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


class StreamWriter:
    """A streamed response written piece by piece; every write failure surfaces as ClientGone. Its subclasses say
    what a piece is: an SSE frame here, Ollama's NDJSON line in api/ollama.py."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.response = web.StreamResponse(status=200, headers=headers)

    async def prepare(self, request: web.Request) -> None:
        """Send the headers."""
        await self.response.prepare(request)

    async def write(self, piece: bytes) -> None:
        try:
            await self.response.write(piece)
        except (ConnectionError, RuntimeError) as exc:
            # aiohttp raises ClientConnectionResetError (a ConnectionResetError) on a closed transport
            raise ClientGone() from exc

    async def close(self) -> None:
        """End the response, unless the client is gone already."""
        try:
            await self.response.write_eof()
        except (ConnectionError, RuntimeError):
            pass


class EventStream(StreamWriter):
    """A text/event-stream response."""

    def __init__(self, headers: dict[str, str] | None = None) -> None:
        super().__init__({**SSE_HEADERS, **(headers or {})})

    async def send(self, data: str, event: str | None = None) -> None:
        """Send one event."""
        await self.write(format_event(data, event))

    async def send_json(self, obj: Any, event: str | None = None) -> None:
        """Send one event whose data is a JSON object."""
        await self.send(dumps(obj), event)

    async def ping(self) -> None:
        """A comment line: keeps proxies from closing an idle stream."""
        await self.write(PING)
