"""The operational routes: the web UI, health, metrics, `/clear` and the OpenAPI document."""

from __future__ import annotations

import time
from pathlib import Path

from aiohttp import web

from api.config import BACKEND, LIFECYCLE, METRICS
from api.http import served_names
from api.openapi import build_spec
from backends.base import BackendError

STATIC = Path(__file__).resolve().parent.parent / "static"


async def clear(request: web.Request) -> web.Response:
    """GET|POST /clear: empty the prefix cache and release cached accelerator memory on every device the model uses;
    requests in flight keep theirs."""
    return web.json_response({"success": True, **await request.app[BACKEND].clear()})


async def health(request: web.Request) -> web.Response:
    """GET /health: 200 when the backend can serve; 503 while loading, after a failed load, when it cannot serve, or
    when shutting down."""
    backend, life = request.app[BACKEND], request.app[LIFECYCLE]
    running, waiting = backend.counts
    body: dict[str, object] = {
        "running": running,
        "waiting": waiting,
        "uptime_s": round(time.time() - backend.started_at, 1),
    }
    status, about = backend.describe()
    if status in ("loading", "failed"):  # no model: no name to show
        return web.json_response({"status": status, **about, **body}, status=503)
    ok = status == "ok" and not life.shutting_down
    body.update(status="shutting_down" if life.shutting_down else status, model=served_names(request.app)[0])
    return web.json_response({**body, **about}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    return web.Response(body=request.app[METRICS].export(), content_type="text/plain", charset="utf-8")


async def openapi_json(request: web.Request) -> web.Response:
    """GET /openapi.json."""
    try:
        names = served_names(request.app)
    except BackendError:  # the model is still loading
        names = ("(loading)",)
    return web.json_response(build_spec(names))


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
    app.router.add_route("GET", "/clear", clear)
    app.router.add_route("POST", "/clear", clear)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_json)
