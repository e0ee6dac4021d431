"""OpenAI legacy completions (`POST /v1/completions`)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    pass
