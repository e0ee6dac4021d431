"""JSON errors in each door's shape, and the middleware that turns every failure before a stream into one."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from api.config import ERROR_SHAPES, REQUEST_ID, ErrorShape
from backends.base import BackendError, Event, Failed, InvalidField
from sse import dumps

log = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """A JSON error in OpenAI's shape (`success: false` too, for ChatGLM clients)."""
    error = {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}
    return {"success": False, "error": error}


def shape_of(request: web.Request) -> ErrorShape:
    """The error shape of the door a request came to: the one registered for the longest prefix of its path (a
    whole segment: "/api" is not "/apiary"), else OpenAI's."""
    shapes = request.app.get(ERROR_SHAPES) or {}
    path = request.path
    best = max((p for p in shapes if path == p or path.startswith(p.rstrip("/") + "/")), key=len, default=None)
    return error_body if best is None else shapes[best]


def error_response(
    request: web.Request,
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A JSON error in the shape of the request's door."""
    body = dumps(shape_of(request)(status, message, param, code))
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


class Refusal(Exception):
    """A request the HTTP layer refuses before any backend sees it (a body of the wrong type or too slow)."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error before a stream starts is JSON with the status that fits; never an HTML page."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except InvalidField as exc:
        return error_response(request, 400, exc.message, exc.param, exc.code)
    except Refusal as exc:
        refused = error_response(request, exc.status, exc.message)
        if exc.close:  # the rest of the request may never come: the connection cannot carry another
            refused.force_close()
        return refused
    except BackendError as exc:
        return error_response(request, exc.status, exc.message, exc.param, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(request, exc.status, exc.reason, headers=headers)
    except Exception:  # a bug of ours: still JSON, and the details stay in the log
        log.exception("request %s failed", request.get(REQUEST_ID))
        return error_response(request, 500, "internal server error")


def failure_response(request: web.Request, event: Failed) -> web.Response:
    """A generation that ended before anything was sent: 503 when the server could not take it, 502 when the upstream
    behind it broke, 499 (nginx's "client closed request", for the log and metrics: nobody reads it) when the client
    left, else 500."""
    status = {"unavailable": 503, "upstream_error": 502, "cancelled": 499}.get(event.type, 500)
    return error_response(request, status, event.message)


def not_started(request: web.Request, first: Event) -> web.Response | None:
    """For a stream: the plain JSON answer when its first event says it never started (a queue timeout, a client
    that left while waiting), so nothing is sent as a stream yet; None when the stream should start."""
    if isinstance(first, Failed) and first.type in ("unavailable", "cancelled"):
        return failure_response(request, first)
    return None
