"""The original ChatGLM web-stream API: `POST /chat` and `POST /stream` (`event: delta` frames)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

from aiohttp import web

from api.config import BACKEND, CONFIG
from api.errors import failure_response
from api.http import answer_stream, events_of, json_off_loop, off_loop, read_body, usage
from api.schema import ChatRequest, parse_chat
from backends.base import ChatJob, Delta, Event, Failed, Finished, KeepAlive, Message, SamplingDefaults, Stream
from sse import EventStream, dumps, format_event

log = logging.getLogger(__name__)

# the original ChatGLM-6B `chat()` defaults, for models whose family brings none of its own
CHATGLM_DEFAULTS = SamplingDefaults(temperature=0.95, top_p=0.7)


def chatglm_messages(system: str | None, history: Sequence[tuple[str, str]], query: str) -> list[Message]:
    """History rounds become user/assistant messages, then the new query."""
    messages = [Message("system", system)] if system else []
    for user, assistant in history:
        messages += [Message("user", user), Message("assistant", assistant)]
    messages.append(Message("user", query))
    return messages


async def start_chat(request: web.Request, req: ChatRequest) -> Stream:
    """History rounds as messages, fitted into the context by the backend (oldest rounds go first). A history may
    hold tens of thousands of rounds within the body limit: its messages are made off the event loop."""
    messages = await off_loop(request, lambda: tuple(chatglm_messages(req.system, req.history, req.query)))
    job = ChatJob(
        messages,
        req.sampling,
        CHATGLM_DEFAULTS,
        max_length=req.max_length,
        trim=True,
        prompt_param="query",
        template_param=None,
        limits=request.app[CONFIG].limits,
    )
    (stream,) = await request.app[BACKEND].open(job)
    return stream


def final_frame(req: ChatRequest, response: str, done: Finished) -> dict[str, Any]:
    """The finished answer's fields. They send the whole history back, so they are made and encoded off the event
    loop (`chat_answer`, `last_delta`)."""
    frame: dict[str, Any] = {
        "query": req.query,
        "response": response,
        "history": [*map(list, req.history), [req.query, response]],
        "finish_reason": done.reason,
    }
    if (counts := usage(done)) is not None:
        frame["usage"] = counts
    return frame


def chat_answer(req: ChatRequest, response: str, done: Finished) -> dict[str, Any]:
    """/chat's answer."""
    return {**final_frame(req, response, done), "success": True}


def last_delta(req: ChatRequest, response: str, done: Finished) -> bytes:
    """/stream's last `event: delta` frame, whole history included, as bytes on the wire."""
    return format_event(dumps({"delta": "", **final_frame(req, response, done), "finished": True}), "delta")


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
                return failure_response(request, event)
            elif isinstance(event, Finished):
                return await json_off_loop(request, partial(chat_answer, req, "".join(text), event))
    finally:
        handle.cancel()
    raise AssertionError("a generation's events end with Finished or Failed")


async def stream(request: web.Request) -> web.StreamResponse:
    """POST /stream: `event: delta` frames, the last one with `finished: true`."""
    req = await read_body(request, parse_chat)
    handle = await start_chat(request, req)
    out = EventStream()
    response = ""

    async def write(events: AsyncIterator[tuple[int, Event]]) -> None:
        nonlocal response
        async for _, event in events:
            if isinstance(event, KeepAlive):
                await out.ping()
            elif isinstance(event, Delta):
                response += event.text
                await out.send_json({"delta": event.text, "response": response, "finished": False}, "delta")
            elif isinstance(event, Finished):
                await out.write(await off_loop(request, partial(last_delta, req, response, event)))
            else:
                error = {"message": event.message, "type": event.type}
                frame = {"delta": "", "response": response, "finished": True, "finish_reason": "error", "error": error}
                await out.send_json(frame, "delta")

    try:
        return await answer_stream(request, [handle], out, write, "a ChatGLM stream")
    finally:
        handle.cancel()  # no-op once finished; stops the generation within a step otherwise


def add_routes(app: web.Application) -> None:
    app.router.add_post("/chat", chat)
    app.router.add_post("/stream", stream)
