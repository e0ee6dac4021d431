"""HTTP plumbing both APIs share: configuration, typed app keys, JSON errors, sampling defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from engine import Engine, EngineStopped, QueueFull, SamplingParams
from schema import InvalidField, Sampling, parse_json
from sse import dumps


@dataclass(frozen=True)
class ServerConfig:
    """What the HTTP layer needs to know."""

    host: str = "127.0.0.1"
    port: int = 8800
    served_model_names: tuple[str, ...] = ()  # empty: the model's own name
    default_max_tokens: int = 1024
    keepalive: float = 15.0  # seconds of silence before a `: ping` comment
    max_body_bytes: int = 1 << 20


CONFIG = web.AppKey("config", ServerConfig)
ENGINE = web.AppKey("engine", Engine)


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
        return error_response(400, exc.message, exc.param)
    except QueueFull as exc:
        return error_response(429, f"server busy: {exc}; retry later", headers={"Retry-After": "1"})
    except EngineStopped as exc:
        return error_response(503, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, exc.reason, headers=headers)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object (413 past the size limit, via aiohttp)."""
    return parse_json(await request.read())


def sampling_params(s: Sampling, max_new_tokens: int, temperature: float, top_p: float) -> SamplingParams:
    """Fill a request's sampling fields with the route's defaults."""
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature if s.temperature is None else s.temperature,
        top_p=top_p if s.top_p is None else s.top_p,
        top_k=s.top_k or 0,
        repetition_penalty=1.0 if s.repetition_penalty is None else s.repetition_penalty,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        stop=s.stop,
        seed=s.seed,
        min_tokens=s.min_tokens,
        ignore_eos=s.ignore_eos,
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def client_gone(request: web.Request) -> bool:
    """True once the client has closed its connection."""
    return request.transport is None or request.transport.is_closing()


def served_names(app: web.Application) -> tuple[str, ...]:
    return app[CONFIG].served_model_names or (app[ENGINE].model.name,)
