"""Per-request middleware: request ids, the connection limit, the API key, one access-log line and metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from typing import Any
from urllib.parse import quote

from aiohttp import web

from api.config import CONFIG, LIFECYCLE, METRICS, OPEN_PATHS, REQUEST_ID, STATS, UNCOUNTED
from api.errors import error_response
from api.metrics import RequestStats
from api.serving import guard_of

log = logging.getLogger("access")
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
PATH_SAFE = "/!$&'()*+,;=:@-._~"  # what stays readable in a logged path; the rest (spaces, newlines) is %-escaped


def request_id(sent: str | None) -> str:
    """The client's X-Request-ID when it is a plain token, else a fresh one: it goes into log lines and headers."""
    if sent is not None and CLIENT_REQUEST_ID.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


@web.middleware
async def request_context(request: web.Request, handler: Any) -> web.StreamResponse:
    """Request id, the connection limit, refusal while shutting down, one log line and metrics per request."""
    app, life = request.app, request.app[LIFECYCLE]
    request[REQUEST_ID] = request_id(request.headers.get("X-Request-ID"))
    request[STATS] = RequestStats()
    counted = request.path not in UNCOUNTED
    response: web.StreamResponse
    if life.shutting_down and counted:
        response = error_response(request, 503, "the server is shutting down")
    elif counted and life.in_flight >= app[CONFIG].max_connections:
        response = error_response(
            request, 429, "too many requests in flight; retry later", headers={"Retry-After": "1"}
        )
    else:
        life.in_flight += counted
        guard = guard_of(request.transport)
        if guard is not None:
            guard.request_started()
        try:
            response = await handler(request)
        except asyncio.CancelledError:  # the client closed the connection and aiohttp cancelled the handler
            _account(request, 499)
            raise
        finally:
            life.in_flight -= counted
            if guard is not None:
                guard.request_ended()
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
        "id=%s %s %s status=%s prompt=%d cached=%d completion=%d ttft=%s duration=%.3f",
        request[REQUEST_ID],
        request.method,
        quote(request.path, safe=PATH_SAFE),
        status,
        stats.prompt_tokens,
        stats.cached_tokens,
        stats.completion_tokens,
        ttft,
        duration,
    )


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: headers, also of streams, carry the request id."""
    if REQUEST_ID in request:
        response.headers["X-Request-ID"] = request[REQUEST_ID]


def key_matches(request: web.Request, api_key: str) -> bool:
    """Whether the request carries the key, as a bearer token or in x-api-key; compared in constant time."""
    scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
    sent = [bearer.strip()] if scheme.lower() == "bearer" else []
    if "x-api-key" in request.headers:
        sent.append(request.headers["x-api-key"].strip())
    # every sent key is compared, so the time taken does not tell which header held a wrong one
    return any([hmac.compare_digest(key.encode(), api_key.encode()) for key in sent])


@web.middleware
async def require_key(request: web.Request, handler: Any) -> web.StreamResponse:
    """The API key on API routes when --api-key is set: `Authorization: Bearer KEY` or (as Anthropic's clients
    send it) `x-api-key: KEY`."""
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
        assert config.api_key is not None
        if not key_matches(request, config.api_key):
            return error_response(request, 401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})
    response: web.StreamResponse = await handler(request)
    return response
