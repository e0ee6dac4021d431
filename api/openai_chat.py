"""OpenAI Chat Completions: `GET /v1/models`, `POST /v1/chat/completions`."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from api.config import BACKEND, CONFIG
from api.errors import failure_response
from api.http import (
    answer_stream,
    chat_job,
    choice_events,
    openai_usage,
    read_body,
    served_model,
    served_names,
)
from api.schema import CompletionRequest, parse_completion
from backends.base import (
    CallDelta,
    Delta,
    Event,
    Failed,
    Finished,
    KeepAlive,
    Stream,
    TokenLogprob,
)
from sse import EventStream, dumps

log = logging.getLogger(__name__)


async def models(request: web.Request) -> web.Response:
    """GET /v1/models, in a shape both OpenAI's and Anthropic's SDKs read (their `models.list()`): OpenAI's list, each
    entry also with Anthropic's `type`, `display_name` and `created_at`, and Anthropic's page fields."""
    started = request.app[BACKEND].started_at
    created_at = datetime.fromtimestamp(started, UTC).isoformat().replace("+00:00", "Z")
    names = served_names(request.app)
    data = [
        {
            "id": name,
            "object": "model",
            "created": int(started),
            "owned_by": "chatglm-stream",
            "type": "model",
            "display_name": name,
            "created_at": created_at,
        }
        for name in names
    ]
    page = {"has_more": False, "first_id": names[0] if names else None, "last_id": names[-1] if names else None}
    return web.json_response({"object": "list", "data": data, **page})


async def start(request: web.Request, req: CompletionRequest) -> tuple[list[Stream], str] | web.Response:
    """Check the model name, then start one generation per choice."""
    model = served_model(request, req.model)
    if isinstance(model, web.Response):
        return model
    job = chat_job(req.messages, request.app[CONFIG].limits, req.tools, req.tool_choice, req.sampling, req.n)
    return await request.app[BACKEND].open(job), model


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
        return await _complete(request, req, handles, base)
    finally:
        for h in handles:
            h.cancel()


def logprobs_part(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """A choice's `logprobs` in OpenAI's shape, for the tokens of a whole answer or of one chunk."""
    content = [
        {
            "token": t.token,
            "logprob": t.logprob,
            "bytes": list(t.bytes),
            "top_logprobs": [{"token": top.token, "logprob": top.logprob, "bytes": list(top.bytes)} for top in t.top],
        }
        for t in tokens
    ]
    return {"content": content, "refusal": None}


def finish_reason(req: CompletionRequest, reason: str) -> str:
    """A legacy `functions` request hears of its call as `function_call`."""
    return "function_call" if reason == "tool_calls" and req.legacy_functions else reason


def message(req: CompletionRequest, text: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """An answer's message: its text (null when it only called), its calls."""
    out: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls and req.legacy_functions:
        out["function_call"] = calls[0]["function"]
    elif calls:
        out["tool_calls"] = calls
    return out


def add_call(calls: list[dict[str, Any]], piece: CallDelta) -> None:
    """A call's streamed piece into the whole calls of an answer."""
    if piece.id is not None:
        calls.append({"id": piece.id, "type": "function", "function": {"name": piece.name, "arguments": ""}})
    calls[piece.index]["function"]["arguments"] += piece.arguments


def call_delta(req: CompletionRequest, piece: CallDelta) -> dict[str, Any]:
    """A streamed piece in OpenAI's shape: the first of a call names it, the rest add to its arguments."""
    function: dict[str, str] = {"arguments": piece.arguments}
    if piece.name is not None:
        function = {"name": piece.name, **function}
    if req.legacy_functions:
        return {"function_call": function}
    call: dict[str, Any] = {"index": piece.index}
    if piece.id is not None:
        call.update(id=piece.id, type="function")
    return {"tool_calls": [{**call, "function": function}]}


async def _complete(
    request: web.Request, req: CompletionRequest, handles: list[Stream], base: dict[str, Any]
) -> web.Response:
    texts = [""] * len(handles)
    calls: list[list[dict[str, Any]]] = [[] for _ in handles]
    tokens: list[list[TokenLogprob]] = [[] for _ in handles]
    reasons = [""] * len(handles)
    stops: list[str | None] = [None] * len(handles)
    done: list[Finished] = []
    async with aclosing(choice_events(request, handles)) as events:
        async for i, event in events:
            if isinstance(event, Delta):
                texts[i] += event.text
                tokens[i] += event.logprobs
                for piece in event.calls:
                    add_call(calls[i], piece)
            elif isinstance(event, Failed):
                return failure_response(request, event)
            elif isinstance(event, Finished):
                reasons[i], stops[i] = event.reason, event.stop_sequence
                done.append(event)
    choices = [
        {
            "index": i,
            "message": message(req, texts[i], calls[i]),
            "logprobs": logprobs_part(tokens[i]) if req.logprobs else None,
            "finish_reason": finish_reason(req, reasons[i]),
            "stop_reason": stops[i],  # vLLM's: the stop string that ended the answer
        }
        for i in range(len(handles))
    ]
    body: dict[str, Any] = {**base, "object": "chat.completion", "choices": choices}
    if (counts := total_usage(done)) is not None:
        body["usage"] = counts
    return web.json_response(body, dumps=dumps)


def total_usage(done: list[Finished]) -> dict[str, Any] | None:
    """The choices' usage together: one prompt, every choice's tokens; None when the backend reported none."""
    if not done or not all(d.usage_known for d in done):
        return None
    return openai_usage(replace(done[0], completion_tokens=sum(d.completion_tokens for d in done)))


def _chunk(
    base: dict[str, Any],
    i: int,
    delta: dict[str, Any],
    reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    stop: str | None = None,
) -> dict[str, Any]:
    choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    if reason is not None:
        choice["stop_reason"] = stop  # vLLM's: the stop string that ended the answer
    return {**base, "object": "chat.completion.chunk", "choices": [choice]}


async def _stream(
    request: web.Request, req: CompletionRequest, handles: list[Stream], base: dict[str, Any]
) -> web.StreamResponse:
    out = EventStream()
    done: list[Finished] = []

    async def write(events: AsyncIterator[tuple[int, Event]]) -> None:
        for i in range(len(handles)):
            await out.send_json(_chunk(base, i, {"role": "assistant", "content": ""}))
        async for i, event in events:
            if isinstance(event, KeepAlive):
                await out.ping()
            elif isinstance(event, Delta):
                logprobs = logprobs_part(event.logprobs) if req.logprobs else None
                if event.text or not event.calls:
                    await out.send_json(_chunk(base, i, {"content": event.text}, logprobs=logprobs))
                    logprobs = None
                for piece in event.calls:
                    if req.legacy_functions and piece.index > 0:  # function_call holds one call
                        continue
                    await out.send_json(_chunk(base, i, call_delta(req, piece), logprobs=logprobs))
                    logprobs = None
            elif isinstance(event, Finished):
                done.append(event)
                await out.send_json(_chunk(base, i, {}, finish_reason(req, event.reason), stop=event.stop_sequence))
            elif isinstance(event, Failed):
                error = {"message": event.message, "type": event.type, "param": None, "code": None}
                await out.send_json({"error": error})
                break
        else:
            if req.include_usage and (totals := total_usage(done)) is not None:
                await out.send_json({**base, "object": "chat.completion.chunk", "choices": [], "usage": totals})
        await out.send("[DONE]")

    return await answer_stream(request, handles, out, write, base["id"])


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", completions)
