"""Anthropic Messages (`POST /v1/messages`, `POST /v1/messages/count_tokens`)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    pass
