"""The original ChatGLM web-stream API: `POST /chat` and `POST /stream` (`event: delta` frames)."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from backend import ChatJob, Stream
from common import BACKEND, events_of, failure_response, not_started, peeked, read_body, usage
from events import Delta, Event, Failed, Finished, KeepAlive
from schema import ChatRequest, parse_chat
from sse import ClientGone, EventStream, dumps
from text import SamplingDefaults, chatglm_messages

log = logging.getLogger(__name__)

# the original ChatGLM-6B `chat()` defaults, for models whose family brings none of its own
CHATGLM_DEFAULTS = SamplingDefaults(temperature=0.95, top_p=0.7)


async def start_chat(request: web.Request, req: ChatRequest) -> Stream:
    """History rounds as messages, fitted into the context by the backend (oldest rounds go first)."""
    messages = tuple(chatglm_messages(req.system, req.history, req.query))
    job = ChatJob(messages, req.sampling, CHATGLM_DEFAULTS, max_length=req.max_length, trim=True, prompt_param="query")
    (stream,) = await request.app[BACKEND].open(request, job)
    return stream


def final_frame(req: ChatRequest, response: str, done: Finished) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "query": req.query,
        "response": response,
        "history": [*map(list, req.history), [req.query, response]],
        "finish_reason": done.reason,
    }
    if (counts := usage(done)) is not None:
        frame["usage"] = counts
    return frame


async def chat(request: web.Request) -> web.Response:
    """POST /chat: the whole answer in one JSON object."""
    req = await read_body(request, parse_chat)
    handle = await start_chat(request, req)
    text: list[str] = []
    try:
        async for event in events_of(request, handle):
            if isinstance(event, Delta):
                text.append(event.text)
            elif isinstance(event, Failed):
                return failure_response(event)
            elif isinstance(event, Finished):
                return web.json_response({**final_frame(req, "".join(text), event), "success": True}, dumps=dumps)
    finally:
        handle.cancel()
    raise AssertionError("a generation's events end with Finished or Failed")


async def stream(request: web.Request) -> web.StreamResponse:
    """POST /stream: `event: delta` frames, the last one with `finished: true`."""
    req = await read_body(request, parse_chat)
    handle = await start_chat(request, req)
    out = EventStream()
    response = ""
    try:
        first, events = await peeked(events_of(request, handle))
        if (refused := not_started(first)) is not None:
            return refused
        await out.prepare(request)
        event: Event
        async for event in events:
            if isinstance(event, KeepAlive):
                await out.ping()
            elif isinstance(event, Delta):
                response += event.text
                await out.send_json({"delta": event.text, "response": response, "finished": False}, "delta")
            elif isinstance(event, Finished):
                frame = {"delta": "", **final_frame(req, response, event), "finished": True}
                await out.send_json(frame, "delta")
            else:
                error = {"message": event.message, "type": event.type}
                frame = {"delta": "", "response": response, "finished": True, "finish_reason": "error", "error": error}
                await out.send_json(frame, "delta")
    except ClientGone:
        log.info("client went away from a stream")
    finally:
        handle.cancel()  # no-op once finished; stops the generation within a step otherwise
    await out.close()
    return out.response


def add_routes(app: web.Application) -> None:
    app.router.add_post("/chat", chat)
    app.router.add_post("/stream", stream)
