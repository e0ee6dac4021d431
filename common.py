"""HTTP plumbing both APIs share: configuration, typed app keys, JSON errors, sampling defaults."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from backend import Backend, BackendError, Stream
from engine import EngineStopped, QueueFull
from events import Event, Failed, Finished
from metrics import Metrics, RequestStats
from sampling import SamplingParams
from schema import InvalidField, Sampling, parse_json
from sse import dumps
from text import ChatRejected, SamplingDefaults

log = logging.getLogger("access")
errors = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    """What the HTTP layer needs to know."""

    host: str = "127.0.0.1"
    port: int = 8800
    served_model_names: tuple[str, ...] = ()  # empty: the model's own name
    default_max_tokens: int = 1024
    keepalive: float = 15.0  # seconds of silence before a `: ping` comment
    max_body_bytes: int = 1 << 20  # larger bodies get 413
    api_key: str | None = None  # when set, API routes need `Authorization: Bearer <key>`
    metrics_need_key: bool = True  # /metrics follows the API key unless this is False
    cors_origins: tuple[str, ...] = ("*",)
    max_prompt_tokens: int | None = None  # None: the model's context length
    # the ChatGLM API keeps at most this many prompt tokens of a conversation's history (None: what the context
    # holds): prefilling a whole 8k context takes tens of seconds on a small CPU
    history_tokens: int | None = 2048
    max_tokens_limit: int = 8192  # ceiling for a request's max_tokens
    max_connections: int = 256  # requests in flight at once before 429
    shutdown_timeout: float = 30.0  # seconds running generations get to finish on SIGTERM


class Lifecycle:
    """Mutable server state the middlewares share: requests in flight, shutting down."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.shutting_down = False


CONFIG = web.AppKey("config", ServerConfig)
BACKEND = web.AppKey("backend", Backend)
METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
PROMPTS = web.AppKey("prompts", ThreadPoolExecutor)  # builds prompts off the event loop
STATS = web.RequestKey("stats", RequestStats)
REQUEST_ID = web.RequestKey("request_id", str)
OPEN_PATHS = frozenset({"/", "/health", "/openapi.json"})
UNCOUNTED = frozenset({"/health", "/metrics"})  # probes never count against the connection limit


# ---- errors ------------------------------------------------------------------------------------

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON error in OpenAI's shape (`success: false` too, for ChatGLM clients)."""
    body = {
        "success": False,
        "error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param, "code": code},
    }
    return web.Response(status=status, text=dumps(body), content_type="application/json", headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error before a stream starts is JSON with the status that fits; never an HTML page."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except InvalidField as exc:
        return error_response(400, exc.message, exc.param, exc.code)
    except BackendError as exc:
        return error_response(exc.status, exc.message, headers=exc.headers)
    except QueueFull as exc:
        return error_response(429, f"server busy: {exc}; retry later", headers={"Retry-After": "1"})
    except ChatRejected as exc:
        return error_response(400, str(exc), "messages" if request.path.startswith("/v1/") else None)
    except EngineStopped as exc:
        return error_response(503, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, exc.reason, headers=headers)
    except Exception:  # a bug of ours: still JSON, and the details stay in the log
        errors.exception("request %s failed", request.get(REQUEST_ID))
        return error_response(500, "internal server error")


@web.middleware
async def request_context(request: web.Request, handler: Any) -> web.StreamResponse:
    """Request id, the connection limit, refusal while shutting down, one log line and metrics per request."""
    app, life = request.app, request.app[LIFECYCLE]
    request[REQUEST_ID] = request.headers.get("X-Request-ID", "")[:128] or uuid.uuid4().hex
    request[STATS] = RequestStats()
    counted = request.path not in UNCOUNTED
    response: web.StreamResponse
    if life.shutting_down and counted:
        response = error_response(503, "the server is shutting down")
    elif counted and life.in_flight >= app[CONFIG].max_connections:
        response = error_response(429, "too many requests in flight; retry later", headers={"Retry-After": "1"})
    else:
        life.in_flight += counted
        try:
            response = await handler(request)
        except asyncio.CancelledError:  # the client closed the connection and aiohttp cancelled the handler
            _account(request, 499)
            raise
        finally:
            life.in_flight -= counted
    _account(request, response.status)
    return response


def _account(request: web.Request, status: int) -> None:
    """A finished request's metrics and its one access log line."""
    stats: RequestStats = request[STATS]
    duration = time.perf_counter() - stats.started
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    request.app[METRICS].requests.labels(route, str(status)).inc()
    if stats.completion_tokens:
        request.app[METRICS].e2e.observe(duration)
    ttft = f"{stats.ttft:.3f}" if stats.ttft is not None else "-"
    log.info(
        "id=%s %s %s status=%s prompt=%d completion=%d ttft=%s duration=%.3f",
        request[REQUEST_ID],
        request.method,
        request.path,
        status,
        stats.prompt_tokens,
        stats.completion_tokens,
        ttft,
        duration,
    )


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: headers, also of streams, carry the request id."""
    if REQUEST_ID in request:
        response.headers["X-Request-ID"] = request[REQUEST_ID]


@web.middleware
async def require_key(request: web.Request, handler: Any) -> web.StreamResponse:
    """`Authorization: Bearer KEY` on API routes when --api-key is set; compared in constant time."""
    config = request.app[CONFIG]
    path = request.path
    is_open = (
        config.api_key is None
        or request.method == "OPTIONS"  # CORS preflights carry no credentials
        or path in OPEN_PATHS
        or path.startswith("/static/")
        or (path == "/metrics" and not config.metrics_need_key)
    )
    if not is_open:
        sent = request.headers.get("Authorization", "")
        scheme, _, key = sent.partition(" ")
        assert config.api_key is not None
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            return error_response(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})
    response: web.StreamResponse = await handler(request)
    return response


def check_limits(config: ServerConfig, max_tokens: int | None, prompt_tokens: int, prompt_param: str) -> None:
    """The server's ceilings on answer and prompt length: 400 naming the limit."""
    if max_tokens is not None and max_tokens > config.max_tokens_limit:
        raise InvalidField(
            "max_tokens", f"'max_tokens' is {max_tokens}; this server allows at most {config.max_tokens_limit}"
        )
    if config.max_prompt_tokens is not None and prompt_tokens > config.max_prompt_tokens:
        raise InvalidField(
            prompt_param,
            f"the prompt has {prompt_tokens} tokens; this server allows at most {config.max_prompt_tokens}",
        )


async def off_loop(request: web.Request, work: Callable[[], T]) -> T:
    """Run work whose cost grows with the request (chat templates, tokenizing, trimming) on the prompt threads,
    so the event loop only does I/O. A client that leaves meanwhile cancels the wait; the result is dropped."""
    return await asyncio.get_running_loop().run_in_executor(request.app[PROMPTS], work)


async def read_body(request: web.Request, parse: Callable[[dict[str, Any]], T]) -> T:
    """The request body as a JSON object (413 past the size limit, via aiohttp), parsed into a typed request off
    the event loop: a body near the size limit takes milliseconds to decode and check."""
    raw = await request.read()
    return await off_loop(request, lambda: parse(parse_json(raw)))


def sampling_params(s: Sampling, max_new_tokens: int, defaults: SamplingDefaults) -> SamplingParams:
    """Fill a request's sampling fields with the defaults (the model family's, else the route's)."""
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=defaults.temperature if s.temperature is None else s.temperature,
        top_p=defaults.top_p if s.top_p is None else s.top_p,
        top_k=defaults.top_k if s.top_k is None else s.top_k,
        repetition_penalty=1.0 if s.repetition_penalty is None else s.repetition_penalty,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        stop=s.stop,
        seed=s.seed,
        min_tokens=s.min_tokens,
        ignore_eos=s.ignore_eos,
    )


def usage(done: Finished) -> dict[str, int] | None:
    """The usage of a finished generation; None when its backend reported none."""
    if not done.usage_known:
        return None
    prompt_tokens, completion_tokens = done.prompt_tokens, done.completion_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def peeked(events: AsyncIterator[T]) -> tuple[T, AsyncIterator[T]]:
    """The first event, and an iterator that yields it again followed by the rest.

    Streams prepare their response only once something has happened, so a request that fails before
    its first token (a queue timeout) still gets a plain JSON error with the right status.
    """
    first = await anext(events)

    async def again() -> AsyncIterator[T]:
        yield first
        async for event in events:
            yield event

    return first, again()


def events_of(request: web.Request, stream: Stream) -> AsyncIterator[Event]:
    """A generation's events, timed into the metrics and the request's log line."""
    events = stream.events(request.app[CONFIG].keepalive, gone=lambda: client_gone(request))
    return request.app[METRICS].observe(events, request[STATS])


def failure_response(event: Failed) -> web.Response:
    """A generation that ended before anything was sent: 503 when the server could not take it, 499 (nginx's
    "client closed request", for the log and metrics: nobody reads it) when the client left, else 500."""
    status = {"unavailable": 503, "cancelled": 499}.get(event.type, 500)
    return error_response(status, event.message)


def not_started(first: Event) -> web.Response | None:
    """For a stream: the plain JSON answer when its first event says it never started (a queue timeout, a client
    that left while waiting), so nothing is sent as a stream yet; None when the stream should start."""
    if isinstance(first, Failed) and first.type in ("unavailable", "cancelled"):
        return failure_response(first)
    return None


def client_gone(request: web.Request) -> bool:
    """True once the client has closed its connection."""
    return request.transport is None or request.transport.is_closing()


def served_names(app: web.Application) -> tuple[str, ...]:
    return app[CONFIG].served_model_names or app[BACKEND].names()
