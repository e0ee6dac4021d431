"""The HTTP layer's configuration and the typed keys of what the app and each request hold."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from api.metrics import Metrics, RequestStats
from backends.base import Backend, Limits


@dataclass(frozen=True)
class ServerConfig:
    """What the HTTP layer needs to know."""

    host: str = "127.0.0.1"
    port: int = 8800
    served_model_names: tuple[str, ...] = ()  # empty: the model's own name
    keepalive: float = 15.0  # seconds of silence before a `: ping` comment
    max_body_bytes: int = 1 << 20  # larger bodies get 413
    api_key: str | None = None  # when set, API routes need `Authorization: Bearer <key>`
    metrics_need_key: bool = True  # /metrics follows the API key unless this is False
    cors_origins: tuple[str, ...] = ()  # pages allowed besides loopback ones ("null": files); "*": any (api.browsers)
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides loopback ones (api.browsers)
    read_timeout: float = 30.0  # seconds a request's head, and then its body, may take to arrive; else 408
    limits: Limits = field(default_factory=Limits)  # ceilings on prompt and answer length, checked by the backends
    max_connections: int = 256  # requests in flight at once before 429
    shutdown_timeout: float = 30.0  # seconds running generations get to finish on SIGTERM


class Lifecycle:
    """Mutable server state the middlewares share: requests in flight, shutting down."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.shutting_down = False


# A door's JSON error body for (status, message, param, code): each door answers errors in its own API's shape
ErrorShape = Callable[[int, str, str | None, str | None], dict[str, Any]]

CONFIG = web.AppKey("config", ServerConfig)
BACKEND = web.AppKey("backend", Backend)
METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
# the error shape of each door's paths, by path prefix ("/api": Ollama's); the rest answer in OpenAI's shape
ERROR_SHAPES = web.AppKey("error_shapes", dict[str, ErrorShape])
PROMPTS = web.AppKey("prompts", ThreadPoolExecutor)  # parses request bodies off the event loop
STATS = web.RequestKey("stats", RequestStats)
REQUEST_ID = web.RequestKey("request_id", str)
OPEN_PATHS = frozenset({"/", "/health", "/openapi.json"})
UNCOUNTED = frozenset({"/health", "/metrics"})  # probes never count against the connection limit
