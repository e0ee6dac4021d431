"""`POST /tokenize` and `POST /detokenize`, in vLLM's shape. A prompt's tokens are the very ids the generating doors
would prompt the model with (the backend builds them from the same job), so `count` is the `usage.prompt_tokens` a
completion of that prompt reports."""

from __future__ import annotations

from aiohttp import web

from api.completions_schema import raw_job
from api.config import BACKEND, CONFIG
from api.http import chat_job, json_off_loop, read_body, served_model
from api.tokens_schema import TokenizeRequest, parse_detokenize, parse_tokenize
from backends.base import ChatJob
from sse import dumps


def job_of(request: web.Request, req: TokenizeRequest) -> ChatJob:
    """The job /v1/completions (a raw prompt: its own builder) or /v1/chat/completions (messages and tools) would
    build."""
    limits = request.app[CONFIG].limits
    if req.prompt is not None:
        return raw_job(req.prompt, limits)
    return chat_job(req.messages, limits, req.tools, req.tool_choice)


async def tokenize(request: web.Request) -> web.Response:
    """POST /tokenize."""
    req = await read_body(request, parse_tokenize)
    if isinstance(refused := served_model(request, req.model), web.Response):
        return refused
    tokens = await request.app[BACKEND].tokenize(job_of(request, req))
    # a huge prompt's ids: long enough to stall every request
    return await json_off_loop(
        request, lambda: {"count": len(tokens.ids), "max_model_len": tokens.context_length, "tokens": list(tokens.ids)}
    )


async def detokenize(request: web.Request) -> web.Response:
    """POST /detokenize."""
    req = await read_body(request, parse_detokenize)
    if isinstance(refused := served_model(request, req.model), web.Response):
        return refused
    text = await request.app[BACKEND].detokenize(req.tokens)
    return web.json_response({"prompt": text}, dumps=dumps)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
