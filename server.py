"""aiohttp app factory, the ChatGLM web-stream routes, health, and the command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

import openai_api
from common import (
    CONFIG,
    ENGINE,
    ServerConfig,
    client_gone,
    error_response,
    json_errors,
    read_json,
    sampling_params,
    served_names,
    usage,
)
from engine import Delta, Engine, EngineConfig, Failed, Finished, KeepAlive, RequestHandle
from loader import LoadedModel, ModelConfig, ModelLoadError, load_model
from schema import ChatRequest, InvalidField, parse_chat
from sse import ClientGone, EventStream, dumps
from text import PromptTooLong, chatglm_messages, fit_chat

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


# ---- ChatGLM web-stream API ---------------------------------------------------------------------

# the original ChatGLM-6B `chat()` defaults
CHATGLM_TEMPERATURE = 0.95
CHATGLM_TOP_P = 0.7


def start_chat(request: web.Request, req: ChatRequest) -> tuple[RequestHandle, int]:
    """Fit the history into the context and submit; returns the handle and the prompt size."""
    engine, config = request.app[ENGINE], request.app[CONFIG]
    lm = engine.model
    messages = chatglm_messages(req.system, req.history, req.query)
    limit, reserve = lm.context_length, req.sampling.max_tokens or config.default_max_tokens
    field = "query"
    if req.sampling.max_tokens is None and req.max_length is not None:
        limit, reserve, field = min(lm.context_length, req.max_length), 1, "max_length"
    try:
        ids, dropped = fit_chat(lm.tokenizer, messages, limit, reserve)
    except PromptTooLong as exc:
        raise InvalidField(field, str(exc)) from exc
    if dropped:
        log.info("dropped %d oldest history messages to fit the context", dropped)
    max_new = min(reserve if field == "query" else limit - len(ids), lm.context_length - len(ids))
    params = sampling_params(req.sampling, max_new, CHATGLM_TEMPERATURE, CHATGLM_TOP_P)
    return engine.submit(ids, params), len(ids)


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
    req = parse_chat(await read_json(request))
    handle, _ = start_chat(request, req)
    text: list[str] = []
    try:
        async for event in handle.events(request.app[CONFIG].keepalive):
            if isinstance(event, KeepAlive) and client_gone(request):
                break
            if isinstance(event, Delta):
                text.append(event.text)
            elif isinstance(event, Failed):
                status = 503 if event.type == "unavailable" else 500
                return error_response(status, event.message)
            elif isinstance(event, Finished):
                return web.json_response({**final_frame(req, "".join(text), event), "success": True}, dumps=dumps)
    finally:
        handle.cancel()
    return error_response(499, "client closed the request")


async def stream(request: web.Request) -> web.StreamResponse:
    """POST /stream: `event: delta` frames, the last one with `finished: true`."""
    req = parse_chat(await read_json(request))
    handle, _ = start_chat(request, req)
    out = EventStream()
    response = ""
    try:
        await out.prepare(request)
        async for event in handle.events(request.app[CONFIG].keepalive):
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


async def clear(request: web.Request) -> web.Response:
    """GET|POST /clear: release cached accelerator memory; requests in flight keep theirs."""
    import torch

    device = request.app[ENGINE].model.device
    if device.startswith("cuda"):
        with torch.cuda.device(device):
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()  # type: ignore[no-untyped-call]
    return web.json_response({"success": True})


async def health(request: web.Request) -> web.Response:
    """GET /health: 200 when the engine runs, 503 otherwise."""
    engine = request.app[ENGINE]
    running, waiting = engine.counts
    lm = engine.model
    body = {
        "status": "ok" if engine.running else "unavailable",
        "model": served_names(request.app)[0],
        "device": lm.device,
        "dtype": lm.dtype,
        "context_length": lm.context_length,
        "running": running,
        "waiting": waiting,
        "uptime_s": round(time.time() - engine.started_at, 1),
    }
    return web.json_response(body, status=200 if engine.running else 503)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


# ---- app and CLI ---------------------------------------------------------------------------------


def create_app(config: ServerConfig, engine: Engine) -> web.Application:
    """Build the application; the engine's worker thread lives as long as the app."""
    app = web.Application(middlewares=[json_errors], client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[ENGINE] = engine

    async def engine_lifetime(app: web.Application) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app.cleanup_ctx.append(engine_lifetime)
    app.router.add_post("/chat", chat)
    app.router.add_post("/stream", stream)
    app.router.add_route("GET", "/clear", clear)
    app.router.add_route("POST", "/clear", clear)
    app.router.add_get("/health", health)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
    openai_api.add_routes(app)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Streaming chat server for ChatGLM and Hugging Face chat models.")
    p.add_argument("--model", type=Path, help="local HF model directory or .gguf file (default: bundled SmolLM2-135M)")
    p.add_argument("--device", help="cpu, a CUDA index (0) or cuda:N (default: cuda:0 if present, else cpu)")
    p.add_argument("--quantize", type=int, default=16, choices=(16, 8, 4), help="16: fp16 on CUDA, own dtype on CPU")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8800)
    p.add_argument("--served-model-name", action="append", default=[], help="name clients use (repeatable)")
    p.add_argument("--default-max-tokens", type=int, default=1024, help="answer length when a request sets none")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests generating at once")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        lm: LoadedModel = load_model(ModelConfig(args.model, args.device, args.quantize))
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = ServerConfig(
        host=args.host,
        port=args.port,
        served_model_names=tuple(args.served_model_name),
        default_max_tokens=args.default_max_tokens,
    )
    engine = Engine(lm, EngineConfig(max_batch_size=args.max_batch_size, max_queue=args.max_queue))
    web.run_app(create_app(config, engine), host=config.host, port=config.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
