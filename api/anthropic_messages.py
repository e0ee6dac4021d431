"""Anthropic Messages: `POST /v1/messages` (the message, or its typed event stream) and
`POST /v1/messages/count_tokens`, over any backend. Every error on these paths is in Anthropic's shape. The header
`anthropic-version` (any value) and the `anthropic-beta` ones are headers, not fields: nothing to check."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from aiohttp import web

from api.anthropic_schema import AnthropicRequest, parse_count, parse_messages
from api.config import BACKEND, CONFIG, ERROR_SHAPES
from api.errors import failure_response
from api.http import answer_stream, choice_events, read_body
from api.tool_fields import arguments_object
from backends.base import ChatJob, Delta, Event, Failed, Finished, KeepAlive, SamplingDefaults, Stream
from sse import EventStream, dumps

log = logging.getLogger(__name__)

# Anthropic's own defaults, for models whose family brings none
ANTHROPIC_DEFAULTS = SamplingDefaults(temperature=1.0, top_p=1.0)

_ERROR_TYPES = {  # Anthropic's error types by status; any other status is an api_error
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    503: "overloaded_error",
}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def anthropic_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """An error in Anthropic's shape; it has no `param`: the message names the field."""
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}


def chat_job(request: web.Request, req: AnthropicRequest) -> ChatJob:
    """The job of a request: the same for /v1/messages and /count_tokens, so the count is the prompt's."""
    return ChatJob(
        req.messages,
        req.sampling,
        ANTHROPIC_DEFAULTS,
        limits=request.app[CONFIG].limits,
        tools=req.tools,
        tool_choice=req.tool_choice,
        prompt_param="messages",
    )


async def messages(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages, streaming or not."""
    req = await read_body(request, parse_messages)
    handles = await request.app[BACKEND].open(chat_job(request, req))
    base = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": req.model}
    try:
        if req.stream:
            return await _stream(request, handles, base)
        return await _complete(request, handles, base)
    finally:
        for h in handles:
            h.cancel()


async def count_tokens(request: web.Request) -> web.Response:
    """POST /v1/messages/count_tokens: the tokens /v1/messages would prompt the model with."""
    req = await read_body(request, parse_count)
    tokens = await request.app[BACKEND].tokenize(chat_job(request, req))
    return web.json_response({"input_tokens": len(tokens.ids)})


def stop_fields(done: Finished) -> dict[str, Any]:
    """`stop_reason` and `stop_sequence`: a stop string that ended the answer is named."""
    reason = "stop_sequence" if done.stop_sequence is not None else _STOP_REASONS.get(done.reason, "end_turn")
    return {"stop_reason": reason, "stop_sequence": done.stop_sequence}


def usage(done: Finished) -> dict[str, int]:
    """The counts (0 from a backend that reported none: Anthropic's usage has no room for unknown)."""
    return {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens}


class Blocks:
    """An answer's content blocks as its deltas arrive, and the stream events that say so. Text streams as it comes:
    a text block opens with the first text (so text deltas join to the block's text exactly). Calls are held until
    the answer ends and then sent whole, each a tool_use block of its own after the text: a backend may stream a
    call's arguments in pieces, also after another call or more text began, and a block once stopped cannot take
    more. (A local model's calls come whole anyway, once parsed.) The whole answer is the same blocks in the same
    order, so a streamed answer and a whole one agree."""

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self._calls: list[tuple[str, str, list[str]]] = []  # (id, name, argument pieces), in the order they began
        self._open = False

    def add(self, delta: Delta) -> list[tuple[str, dict[str, Any]]]:
        """The events of a delta."""
        events: list[tuple[str, dict[str, Any]]] = []
        if delta.text:
            if not self._open:
                events += self._start({"type": "text", "text": ""})
            self.content[-1]["text"] += delta.text
            events.append(_delta(len(self.content) - 1, {"type": "text_delta", "text": delta.text}))
        for piece in delta.calls:
            if piece.id is not None:
                self._calls.append((piece.id, piece.name or "", []))
            self._calls[piece.index][2].append(piece.arguments)
        return events

    def close(self) -> list[tuple[str, dict[str, Any]]]:
        """At the answer's end: the open text block stops, then each call is a tool_use block, sent whole."""
        events = self._stop()
        for call_id, name, pieces in self._calls:
            arguments = "".join(pieces)
            events += self._start({"type": "tool_use", "id": call_id, "name": name, "input": {}})
            self.content[-1]["input"] = arguments_object(arguments)
            if arguments:
                events.append(_delta(len(self.content) - 1, {"type": "input_json_delta", "partial_json": arguments}))
            events += self._stop()
        self._calls = []
        return events

    def final(self) -> list[dict[str, Any]]:
        """The blocks of the whole answer, each call's input as an object."""
        self.close()
        return self.content

    def _stop(self) -> list[tuple[str, dict[str, Any]]]:
        if not self._open:
            return []
        self._open = False
        return [("content_block_stop", {"type": "content_block_stop", "index": len(self.content) - 1})]

    def _start(self, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        self.content.append(block)
        self._open = True
        start = {"type": "content_block_start", "index": len(self.content) - 1, "content_block": dict(block)}
        return [("content_block_start", start)]


def _delta(index: int, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}


async def _complete(request: web.Request, handles: list[Stream], base: dict[str, Any]) -> web.Response:
    blocks = Blocks()
    async with aclosing(choice_events(request, handles)) as events:
        async for _, event in events:
            if isinstance(event, Delta):
                blocks.add(event)
            elif isinstance(event, Failed):
                return failure_response(request, event)
            elif isinstance(event, Finished):
                body = {**base, "content": blocks.final(), **stop_fields(event), "usage": usage(event)}
                return web.json_response(body, dumps=dumps)
    raise AssertionError("a generation's events end with Finished or Failed")


async def _stream(request: web.Request, handles: list[Stream], base: dict[str, Any]) -> web.StreamResponse:
    out = EventStream()
    blocks = Blocks()

    async def write(events: AsyncIterator[tuple[int, Event]]) -> None:
        # the prompt's count where the backend knows it now (a local model); else it comes with the end, in
        # message_delta's usage, which the SDKs merge into the message
        start = {**base, "content": [], "stop_reason": None, "stop_sequence": None}
        start["usage"] = {"input_tokens": handles[0].prompt_tokens or 0, "output_tokens": 0}
        await out.send_json({"type": "message_start", "message": start}, event="message_start")
        await out.send_json({"type": "ping"}, event="ping")  # as Anthropic sends one
        async for _, event in events:
            if isinstance(event, KeepAlive):
                await out.send_json({"type": "ping"}, event="ping")
            elif isinstance(event, Delta):
                for name, data in blocks.add(event):
                    await out.send_json(data, event=name)
            elif isinstance(event, Finished):
                for name, data in blocks.close():
                    await out.send_json(data, event=name)
                end = {"type": "message_delta", "delta": stop_fields(event), "usage": usage(event)}
                await out.send_json(end, event="message_delta")
                await out.send_json({"type": "message_stop"}, event="message_stop")
            elif isinstance(event, Failed):
                kind = "overloaded_error" if event.type == "unavailable" else "api_error"
                error = {"type": "error", "error": {"type": kind, "message": event.message}}
                await out.send_json(error, event="error")
                break

    return await answer_stream(request, handles, out, write, base["id"])


def add_routes(app: web.Application) -> None:
    app[ERROR_SHAPES]["/v1/messages"] = anthropic_error
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
