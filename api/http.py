"""Helpers the doors share: bodies parsed off the event loop, a stream's first event, usage, client state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from aiohttp import web

from api.config import BACKEND, CONFIG, METRICS, PROMPTS, STATS
from api.schema import parse_json
from backends.base import Event, Finished, Stream

T = TypeVar("T")


async def off_loop(request: web.Request, work: Callable[[], T]) -> T:
    """Run work whose cost grows with the request (decoding and checking a body) on the app's threads, so
    the event loop only does I/O. A client that leaves meanwhile cancels the wait; the result is dropped."""
    return await asyncio.get_running_loop().run_in_executor(request.app[PROMPTS], work)


async def read_body(request: web.Request, parse: Callable[[dict[str, Any]], T]) -> T:
    """The request body as a JSON object (413 past the size limit, via aiohttp), parsed into a typed request off
    the event loop: a body near the size limit takes milliseconds to decode and check."""
    raw = await request.read()
    return await off_loop(request, lambda: parse(parse_json(raw)))


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


def client_gone(request: web.Request) -> bool:
    """True once the client has closed its connection."""
    return request.transport is None or request.transport.is_closing()


def served_names(app: web.Application) -> tuple[str, ...]:
    return app[CONFIG].served_model_names or app[BACKEND].names()
