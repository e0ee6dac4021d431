"""OpenAI Chat Completions: `GET /v1/models`, `POST /v1/chat/completions`."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from aiohttp import web

from common import (
    CONFIG,
    ENGINE,
    ServerConfig,
    check_limits,
    error_response,
    events_of,
    failure_response,
    not_started,
    off_loop,
    peeked,
    read_body,
    sampling_params,
    served_names,
    usage,
)
from events import Delta, Event, Failed, Finished, KeepAlive, RequestHandle
from loader import LoadedModel
from schema import CompletionRequest, parse_completion
from sse import ClientGone, EventStream, dumps
from text import SamplingDefaults

log = logging.getLogger(__name__)


async def models(request: web.Request) -> web.Response:
    """GET /v1/models."""
    created = int(request.app[ENGINE].started_at)
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "chatglm-stream"}
        for name in served_names(request.app)
    ]
    return web.json_response({"object": "list", "data": data})


# OpenAI's own defaults, for models whose family brings none
OPENAI_DEFAULTS = SamplingDefaults(temperature=1.0, top_p=1.0)


def plan_completion(lm: LoadedModel, config: ServerConfig, req: CompletionRequest) -> list[int] | web.Response:
    """Prompt ids, or the 400 for a prompt over the context. Runs off the event loop: its cost grows with the
    conversation."""
    ids = lm.chat.encode(req.messages)
    if len(ids) >= lm.context_length:
        message = (
            f"This model's maximum context length is {lm.context_length} tokens. "
            f"However, your messages resulted in {len(ids)} tokens."
        )
        return error_response(400, message, "messages", "context_length_exceeded")
    check_limits(config, req.sampling.max_tokens, len(ids), "messages")
    return ids


async def start(request: web.Request, req: CompletionRequest) -> tuple[list[RequestHandle], str] | web.Response:
    """Check model and context, then submit one generation per choice."""
    engine, config = request.app[ENGINE], request.app[CONFIG]
    names = served_names(request.app)
    if req.model is not None and req.model not in names:
        return error_response(
            404,
            f"The model '{req.model}' does not exist; this server serves {', '.join(names)}",
            "model",
            "model_not_found",
        )
    lm = engine.model
    ids = await off_loop(request, lambda: plan_completion(lm, config, req))
    if isinstance(ids, web.Response):
        return ids
    defaults = lm.chat.defaults or OPENAI_DEFAULTS
    room = min(lm.context_length - len(ids), config.max_tokens_limit)
    if req.sampling.max_tokens is None and defaults.max_length is not None:
        wanted = defaults.max_length - len(ids)  # the family's length in its own sense: prompt + answer
    else:
        wanted = req.sampling.max_tokens or config.default_max_tokens
    params = sampling_params(req.sampling, max(1, min(wanted, room)), defaults)
    handles: list[RequestHandle] = []
    try:
        for i in range(req.n):
            # each choice gets its own stream of randomness, reproducible from the request's seed
            seed = None if params.seed is None else params.seed + i
            handles.append(engine.submit(ids, replace(params, seed=seed)))
    except Exception:
        for h in handles:
            h.cancel()
        raise
    return handles, req.model or names[0]


async def merge(request: web.Request, handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Event]]:
    """Events of several choices as they come, tagged with the choice index, timed into the metrics."""
    if len(handles) == 1:
        async for event in events_of(request, handles[0]):
            yield 0, event
        return
    merged: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        async for event in events_of(request, handle):
            merged.put_nowait((i, event))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    left = len(handles)
    try:
        while left:
            i, event = await merged.get()
            if isinstance(event, (Finished, Failed)):
                left -= 1
            yield i, event
    finally:
        for task in tasks:
            task.cancel()


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, streaming or not."""
    req = await read_body(request, parse_completion)
    started = await start(request, req)
    if isinstance(started, web.Response):
        return started
    handles, model = started
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    try:
        if req.stream:
            return await _stream(request, req, handles, base)
        return await _complete(request, handles, base)
    finally:
        for h in handles:
            h.cancel()


async def _complete(request: web.Request, handles: list[RequestHandle], base: dict[str, Any]) -> web.Response:
    texts = [""] * len(handles)
    reasons = [""] * len(handles)
    prompt_tokens = completion_tokens = 0
    async for i, event in merge(request, handles):
        if isinstance(event, Delta):
            texts[i] += event.text
        elif isinstance(event, Failed):
            return failure_response(event)
        elif isinstance(event, Finished):
            reasons[i] = event.reason
            prompt_tokens = event.prompt_tokens
            completion_tokens += event.completion_tokens
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
        for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
    ]
    body = {**base, "object": "chat.completion", "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}
    return web.json_response(body, dumps=dumps)


def _chunk(base: dict[str, Any], i: int, delta: dict[str, str], reason: str | None = None) -> dict[str, Any]:
    choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
    return {**base, "object": "chat.completion.chunk", "choices": [choice]}


async def _stream(
    request: web.Request, req: CompletionRequest, handles: list[RequestHandle], base: dict[str, Any]
) -> web.StreamResponse:
    out = EventStream()
    prompt_tokens = completion_tokens = 0
    try:
        (_, first), events = await peeked(merge(request, handles))
        if (refused := not_started(first)) is not None:
            return refused
        await out.prepare(request)
        for i in range(len(handles)):
            await out.send_json(_chunk(base, i, {"role": "assistant", "content": ""}))
        async for i, event in events:
            if isinstance(event, KeepAlive):
                await out.ping()
            elif isinstance(event, Delta):
                await out.send_json(_chunk(base, i, {"content": event.text}))
            elif isinstance(event, Finished):
                prompt_tokens = event.prompt_tokens
                completion_tokens += event.completion_tokens
                await out.send_json(_chunk(base, i, {}, event.reason))
            elif isinstance(event, Failed):
                error = {"message": event.message, "type": event.type, "param": None, "code": None}
                await out.send_json({"error": error})
                break
        else:
            if req.include_usage:
                totals = usage(prompt_tokens, completion_tokens)
                await out.send_json({**base, "object": "chat.completion.chunk", "choices": [], "usage": totals})
        await out.send("[DONE]")
    except ClientGone:
        log.info("client went away from %s", base["id"])
    await out.close()
    return out.response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", completions)
