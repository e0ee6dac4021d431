"""aiohttp app factory, the operational routes (health, metrics, clear, OpenAPI, web UI), and the command line."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from api import anthropic_messages, chatglm_web, ollama, openai_chat, openai_completions, operations, tokens
from api.browsers import BrowserPolicy, browser_guard, cors_headers
from api.config import BACKEND, CONFIG, ERROR_SHAPES, LIFECYCLE, METRICS, PROMPTS, Lifecycle, ServerConfig
from api.errors import json_errors
from api.metrics import Metrics
from api.middleware import echo_request_id, request_context, require_key
from api.serving import serve
from backends.base import Backend, Limits
from backends.upstream import UpstreamBackend, UpstreamConfig, url_problem
from models.devices import DTYPES
from models.loader import ModelConfig, ModelLoadError, default_cache_dir, load, preflight
from models.tools.formats import PARSER_NAMES

if TYPE_CHECKING:
    from engine import Engine

log = logging.getLogger(__name__)
API_KEY_ENV = "CHAT_API_KEY"
UPSTREAM_KEY_ENV = "CHAT_UPSTREAM_API_KEY"


# ---- app and CLI ---------------------------------------------------------------------------------


def as_backend(backend: Backend | Engine) -> Backend:
    """An engine is served by the local backend. Imported only then: an upstream server never loads torch."""
    engine = sys.modules.get("engine")
    if engine is not None and isinstance(backend, engine.Engine):
        from backends.local import LocalBackend

        return LocalBackend(backend)
    return backend  # type: ignore[return-value]


def create_app(config: ServerConfig, backend: Backend | Engine) -> web.Application:
    """Build the application; the backend (a local engine's worker thread, an upstream's connections) lives as long
    as the app."""
    policy = BrowserPolicy.of(config.host, config.allowed_hosts, config.cors_origins)
    app = web.Application(
        # the browser checks come before the key: a page that may not call us learns nothing, not even 401
        middlewares=[request_context, browser_guard(policy), require_key, json_errors],
        client_max_size=config.max_body_bytes,
    )
    chosen = as_backend(backend)
    app[CONFIG] = config
    app[BACKEND] = chosen
    app[METRICS] = Metrics(chosen)
    app[LIFECYCLE] = Lifecycle()
    app[ERROR_SHAPES] = {}  # each door's add_routes names the shape of its errors

    async def backend_lifetime(app: web.Application) -> AsyncIterator[None]:
        await chosen.start()
        yield
        await chosen.stop(10.0)

    async def body_threads(app: web.Application) -> AsyncIterator[None]:
        app[PROMPTS] = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bodies")
        yield
        app[PROMPTS].shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(backend_lifetime)
    app.cleanup_ctx.append(body_threads)
    app.on_shutdown.append(drain)
    app.on_response_prepare.append(echo_request_id)
    app.on_response_prepare.append(cors_headers)
    operations.add_routes(app)
    chatglm_web.add_routes(app)
    openai_chat.add_routes(app)
    openai_completions.add_routes(app)
    anthropic_messages.add_routes(app)
    ollama.add_routes(app)
    tokens.add_routes(app)
    return app


async def drain(app: web.Application) -> None:
    """on_shutdown: refuse new requests, let running ones finish for a while, then end the rest.

    Requests still running after `shutdown_timeout` get a final error frame when the backend stops.
    """
    app[LIFECYCLE].shutting_down = True
    backend, timeout = app[BACKEND], app[CONFIG].shutdown_timeout
    deadline = time.monotonic() + timeout
    # the counts live on the worker thread; there is no asyncio event to wait on
    while backend.counts != (0, 0) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    if backend.counts != (0, 0):
        log.warning("shutdown: ending %d unfinished requests", sum(backend.counts))
    # whatever the worker is doing (a long prefill), what is left ends within the timeout, not after the step
    await backend.stop(max(0.5, deadline - time.monotonic()))


async def watch_loading(app: web.Application) -> AsyncIterator[None]:
    """Stop the server with an error if the backend fails to start (a model that does not load)."""

    async def wait() -> None:
        error = await app[BACKEND].ready()
        if error is not None:
            # a problem with the model the user named is one line; anything else is our bug: show where
            trace = None if isinstance(error, ModelLoadError) else error
            log.error("could not load the model: %s", error, exc_info=trace)
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            log.info("ready; serving on http://%s:%d", app[CONFIG].host, app[CONFIG].port)

    task = asyncio.create_task(wait())
    yield
    task.cancel()


class StartupError(Exception):
    """The server cannot start as asked (an address in use, flags that contradict); the message is for the user."""


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use costs a second, not a model load."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise StartupError(f"--host {host}: cannot resolve it ({exc.strerror})") from exc
    sock = socket.socket(family, kind, proto)
    try:
        if os.name == "posix":  # as aiohttp does: a restart need not wait for old connections to time out
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"--port {port}: address {host}:{port} is already in use (another server?)") from exc
        if exc.errno == errno.EACCES:
            raise StartupError(f"--port {port}: permission denied (ports below 1024 need privileges)") from exc
        raise StartupError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from exc
    return sock


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Streaming chat server for ChatGLM and Hugging Face chat models.")
    a = p.add_argument
    a("--model", type=Path, help="local HF model directory or .gguf file (default: bundled SmolLM2-135M)")
    a("--device", help="cpu, a CUDA index (0) or cuda:N (default: cuda:0 if present, else cpu)")
    a(
        "--quantize",
        default="auto",
        choices=("auto", "16", "8", "4"),
        help="weight bits: 16 keeps --dtype, 8 and 4 quantize; auto: the checkpoint's own (a GGUF file's level)",
    )
    a("--dtype", default="auto", choices=DTYPES, help="auto: bf16 where the device computes it natively")
    a("--cache-dir", type=Path, default=default_cache_dir(), help="converted GGUF models (default: %(default)s)")
    a("--save-native", type=Path, help="write an original ChatGLM2/3 or GLM-4 checkpoint in transformers' layout, exit")
    a("--no-cache", action="store_true", help="convert a GGUF model on every start instead")
    a(
        "--tool-call-parser",
        choices=PARSER_NAMES,
        help="the tool-call format of the model (default: its family's, or what its chat template shows)",
    )
    a("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    a("--port", type=int, default=8800)
    a("--served-model-name", action="append", default=[], help="name clients use (repeatable)")
    a("--default-max-tokens", type=int, default=1024, help="answer length when a request sets none")
    a("--max-batch-size", type=int, help="requests decoded together in one forward pass (default: what memory holds)")
    a("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    a(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prompt tokens prefilled between two decode steps at most (0: no limit)",
    )
    a(
        "--prefill-seconds",
        type=float,
        default=0.7,
        help="seconds of prompt work between two decode steps: fewer tokens than --prefill-chunk where they take "
        "longer on this machine (measured while serving)",
    )
    a(
        "--prefix-cache-mb",
        type=float,
        help="memory for earlier requests' keys and values, reused by prompts that start the same way (a "
        "conversation's history, a shared system prompt); default: a quarter of the memory left after the weights "
        "and the batch's cache; 0: off",
    )
    a(
        "--loop-guard",
        choices=("late", "on", "off"),
        help="structured output: lower the tokens that would repeat a span of a JSON answer once more, so that a "
        "small model ends its JSON instead of looping until max_tokens. late (the default): only once the answer "
        "has used half its token budget, digits counting as one symbol so that counting is a repeat too; on: from "
        "the first token, word for word (also ends lists that repeat on purpose early); off. Digits are never "
        "lowered",
    )
    a("--threads", type=int, help="torch compute threads (default: measured while serving, at most the cores)")
    a("--queue-timeout", type=float, default=600.0, help="seconds a request may wait for a slot before 503")
    a("--api-key", default=os.environ.get(API_KEY_ENV), help=f"require this bearer key (or set ${API_KEY_ENV})")
    a("--metrics-no-key", action="store_true", help="serve /metrics without the API key")
    a(
        "--cors-origins",
        default="",
        help="comma-separated web origins whose pages may call the API, besides loopback pages; 'null': pages "
        "opened from a file (any site can send it from a sandboxed frame); '*': any page on any site",
    )
    a(
        "--allowed-hosts",
        default="",
        help="comma-separated names clients may reach this server by (the Host header), besides localhost, "
        "127.0.0.1 and [::1]; '.example.com' includes its subdomains, '*' any name (default: any name unless bound "
        "to loopback)",
    )
    a(
        "--read-timeout",
        type=float,
        default=30.0,
        help="seconds a request's headers, then its body, may take to arrive before 408",
    )
    a("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    a("--max-prompt-tokens", type=int, help="longer prompts get 400 (default: the model's context)")
    a(
        "--history-tokens",
        type=int,
        default=2048,
        help="/chat and /stream drop the oldest rounds of a history past this many prompt tokens; the query is "
        "always kept (default 2048; 0: as much as the context holds)",
    )
    a("--max-tokens-limit", type=int, default=8192, help="a request's max_tokens above this gets 400")
    a("--max-connections", type=int, default=256, help="requests in flight before 429")
    a("--shutdown-timeout", type=float, default=30.0, help="seconds running answers get to finish on SIGTERM")
    a("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    a("--upstream", help="serve from this OpenAI-compatible engine (its base URL, ending in /v1) instead of a model")
    a("--upstream-api-key", default=os.environ.get(UPSTREAM_KEY_ENV), help=f"its bearer key (or ${UPSTREAM_KEY_ENV})")
    a("--upstream-model", help="the model name to ask it for (default: the first it lists)")
    return p.parse_args(argv)


def local_flags(args: argparse.Namespace) -> list[str]:
    """The flags that only mean something for a local model."""
    given = {
        "--model": args.model is not None,
        "--device": args.device is not None,
        "--quantize": args.quantize != "auto",
        "--dtype": args.dtype != "auto",
        "--save-native": args.save_native is not None,
        "--tool-call-parser": args.tool_call_parser is not None,
        "--threads": args.threads is not None,
        "--prefix-cache-mb": args.prefix_cache_mb is not None,
        "--loop-guard": args.loop_guard is not None,
    }
    return [flag for flag, set_ in given.items() if set_]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quantize = None if args.quantize == "auto" else int(args.quantize)
    cache = None if args.no_cache else args.cache_dir
    model_config = ModelConfig(
        args.model, args.device, quantize, cache, args.dtype, args.save_native, tool_parser=args.tool_call_parser
    )
    try:
        if args.threads is not None and args.threads < 1:
            raise StartupError(f"--threads {args.threads}: expected 1 or more")
        if args.prefill_seconds <= 0:
            raise StartupError(f"--prefill-seconds {args.prefill_seconds:g}: expected more than 0")
        if args.read_timeout <= 0:
            raise StartupError(f"--read-timeout {args.read_timeout:g}: expected more than 0")
        if args.prefix_cache_mb is not None and args.prefix_cache_mb < 0:
            raise StartupError(f"--prefix-cache-mb {args.prefix_cache_mb:g}: expected 0 (off) or more")
        if args.upstream and (flags := local_flags(args)):
            raise StartupError(f"--upstream serves from another engine: {', '.join(flags)} belong to a local model")
        if args.upstream and (problem := url_problem(args.upstream)) is not None:
            raise StartupError("--upstream: " + problem)  # never the URL itself: it may hold a password
        if not args.upstream:
            preflight(model_config)  # the mistakes a user can fix, before anything starts
        if args.save_native is not None:  # a conversion, not a server
            load(ModelConfig(args.model, "cpu", 16, None, args.dtype, args.save_native))
            print(f"wrote {args.save_native}; load it with AutoModelForCausalLM.from_pretrained")
            return 0
        sock = bind(args.host, args.port)
    except (ModelLoadError, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = ServerConfig(
        host=args.host,
        port=sock.getsockname()[1],  # the port itself when asked for port 0
        served_model_names=tuple(args.served_model_name),
        max_body_bytes=args.max_body_bytes,
        api_key=args.api_key or None,
        metrics_need_key=not args.metrics_no_key,
        cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()),
        allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()),
        read_timeout=args.read_timeout,
        limits=Limits(
            default_max_tokens=args.default_max_tokens,
            max_tokens_limit=args.max_tokens_limit,
            max_prompt_tokens=args.max_prompt_tokens,
            history_tokens=args.history_tokens if args.history_tokens > 0 else None,
        ),
        max_connections=args.max_connections,
        shutdown_timeout=args.shutdown_timeout,
    )
    backend: Backend | Engine
    engine: Engine | None = None
    if args.upstream:
        backend = UpstreamBackend(UpstreamConfig(args.upstream, args.upstream_api_key, args.upstream_model))
    else:  # loads on the worker: /health says 503 meanwhile
        from engine import Engine, EngineConfig
        from generation.loop_guard import FROM_THE_START, LATE
        from generation.prepare import load_model

        engine_config = EngineConfig(
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            queue_timeout=args.queue_timeout,
            prefill_chunk=max(0, args.prefill_chunk),
            prefill_seconds=args.prefill_seconds,
            threads=args.threads,
            prefix_cache_mb=args.prefix_cache_mb,
            loop_guard={"late": LATE, "on": FROM_THE_START, "off": None}[args.loop_guard or "late"],
        )
        backend = engine = Engine(lambda: load_model(model_config), engine_config)
    app = create_app(config, backend)
    app.cleanup_ctx.append(watch_loading)
    serve(app, sock, config.read_timeout)
    if engine is not None:
        if engine.load_error is not None:
            print(f"error: cannot load the model: {engine.load_error}", file=sys.stderr)
            return 2 if isinstance(engine.load_error, ModelLoadError) else 1
        if not engine.ready.is_set():
            log.info("stopped before the model finished loading")
    return 0


def exit_now(status: int) -> None:
    """Exit without waiting for threads: a model load, a long forward pass or a prompt being built cannot be
    interrupted, and every answer has been sent or ended by now, so waiting for them would only delay the exit."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_now(main())
