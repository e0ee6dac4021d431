"""The original ChatGLM web-stream API: `POST /chat` and `POST /stream` (`event: delta` frames)."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from common import (
    CONFIG,
    ENGINE,
    ServerConfig,
    check_limits,
    events_of,
    failure_response,
    not_started,
    off_loop,
    peeked,
    read_body,
    sampling_params,
    usage,
)
from events import Delta, Event, Failed, Finished, KeepAlive, RequestHandle
from loader import LoadedModel
from sampling import SamplingParams
from schema import ChatRequest, InvalidField, parse_chat
from sse import ClientGone, EventStream, dumps
from text import PromptTooLong, SamplingDefaults, chatglm_messages, fit_chat

log = logging.getLogger(__name__)

# the original ChatGLM-6B `chat()` defaults, for models whose family brings none of its own
CHATGLM_DEFAULTS = SamplingDefaults(temperature=0.95, top_p=0.7)


def plan_chat(lm: LoadedModel, config: ServerConfig, req: ChatRequest) -> tuple[list[int], SamplingParams]:
    """Prompt ids and sampling settings: the history fitted into the context (oldest rounds go first).

    Runs off the event loop: its cost grows with the history."""
    defaults = lm.chat.defaults or CHATGLM_DEFAULTS
    messages = chatglm_messages(req.system, req.history, req.query)
    # a length in ChatGLM's sense (prompt + answer): the request's max_length, else the family's default
    cap, field = None, "query"
    if req.sampling.max_tokens is None:
        if req.max_length is not None:
            cap, field = req.max_length, "max_length"
        else:
            cap = defaults.max_length
    limit = min(lm.context_length, cap) if cap is not None else lm.context_length
    # history goes only when the prompt would not fit, leaving room for the answer length a client asked for
    try:
        ids, dropped = fit_chat(lm.chat, messages, limit, req.sampling.max_tokens or 1)
    except PromptTooLong as exc:
        raise InvalidField(field, str(exc)) from exc
    if dropped:
        log.info("dropped %d oldest history messages to fit the context", dropped)
    check_limits(config, req.sampling.max_tokens, len(ids), "query")
    wanted = limit - len(ids) if cap is not None else (req.sampling.max_tokens or config.default_max_tokens)
    max_new = min(wanted, lm.context_length - len(ids), config.max_tokens_limit)
    return ids, sampling_params(req.sampling, max_new, defaults)


async def start_chat(request: web.Request, req: ChatRequest) -> RequestHandle:
    """Build the prompt off the event loop, then submit."""
    engine, config = request.app[ENGINE], request.app[CONFIG]
    lm = engine.model
    ids, params = await off_loop(request, lambda: plan_chat(lm, config, req))
    return engine.submit(ids, params)


def final_frame(req: ChatRequest, response: str, done: Finished) -> dict[str, Any]:
    return {
        "query": req.query,
        "response": response,
        "history": [*map(list, req.history), [req.query, response]],
        "finish_reason": done.reason,
        "usage": usage(done.prompt_tokens, done.completion_tokens),
    }


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
        log.info("client went away from request %s", handle.id)
    finally:
        handle.cancel()  # no-op once finished; stops the worker within a step otherwise
    await out.close()
    return out.response


def add_routes(app: web.Application) -> None:
    app.router.add_post("/chat", chat)
    app.router.add_post("/stream", stream)
