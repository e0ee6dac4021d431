"""Helpers the doors share: bodies parsed off the event loop, a stream's first event, usage, client state."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from aiohttp import web

from api.config import BACKEND, CONFIG, METRICS, PROMPTS, STATS
from api.errors import Refusal, error_response, not_started
from api.schema import parse_json
from backends.base import (
    ChatJob,
    Event,
    Failed,
    Finished,
    Limits,
    Message,
    Sampling,
    SamplingDefaults,
    Stream,
    Tool,
    ToolChoice,
)
from sse import ClientGone, dumps

log = logging.getLogger(__name__)
T = TypeVar("T")

# OpenAI's own defaults, for models whose family brings none (the OpenAI doors and those that follow them)
OPENAI_DEFAULTS = SamplingDefaults(temperature=1.0, top_p=1.0)


def chat_job(
    messages: tuple[Message, ...],
    limits: Limits,
    tools: tuple[Tool, ...] = (),
    tool_choice: ToolChoice | None = None,
    sampling: Sampling | None = None,
    n: int = 1,
) -> ChatJob:
    """The job of an OpenAI conversation: the one builder of it, for /v1/chat/completions to generate from and for
    /tokenize to count, so the ids /tokenize gives are the ids generated from."""
    return ChatJob(
        messages,
        sampling or Sampling(),
        OPENAI_DEFAULTS,
        n=n,
        limits=limits,
        tools=tools,
        tool_choice=tool_choice or ToolChoice(),
    )


async def off_loop(request: web.Request, work: Callable[[], T]) -> T:
    """Run work whose cost grows with the request (decoding and checking a body) on the app's threads, so
    the event loop only does I/O. A client that leaves meanwhile cancels the wait; the result is dropped."""
    return await asyncio.get_running_loop().run_in_executor(request.app[PROMPTS], work)


async def json_off_loop(request: web.Request, make: Callable[[], Any]) -> web.Response:
    """A JSON answer made and encoded off the event loop (`off_loop`): for answers that grow with the request (a
    huge prompt's ids, a history of thousands of rounds sent back), which would keep every other request waiting."""
    text = await off_loop(request, lambda: dumps(make()))
    return web.Response(text=text, content_type="application/json")


def is_json(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


async def read_body(request: web.Request, parse: Callable[[dict[str, Any]], T]) -> T:
    """The request body as a JSON object, parsed into a typed request off the event loop: a body near the size limit
    takes milliseconds to decode and check.

    415 unless it says it is JSON: form, multipart and text bodies are what a page on another site can send without
    asking the browser first (see `api.browsers`). 413 past the size limit (aiohttp's), 408 when it does not arrive
    within --read-timeout: a client sending a byte a second would otherwise hold its connection forever.
    """
    if not is_json(request.content_type):
        sent = request.headers.get("Content-Type", "none")[:100]
        raise Refusal(415, f"send the body as JSON with Content-Type: application/json (got {sent!r})")
    timeout = request.app[CONFIG].read_timeout
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError:
        raise Refusal(408, f"the request body did not arrive within {timeout:g} s", close=True) from None
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


def openai_usage(done: Finished) -> dict[str, Any] | None:
    """OpenAI's usage: the counts, and the prompt tokens the prefix cache served (`prompt_tokens_details`) where the
    backend said."""
    if (counts := usage(done)) is None:
        return None
    if done.cached_tokens is None:
        return counts
    return {**counts, "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


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


async def merge(streams: list[AsyncIterator[Event]]) -> AsyncGenerator[tuple[int, Event]]:
    """Events of several choices as they come, tagged with the choice index. Every choice ends with Finished or
    Failed, also one whose events raise (a bug): it ends Failed. Close it (`aclosing`) to stop the readers early."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    merged: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(i: int, events: AsyncIterator[Event]) -> None:
        try:
            async for event in events:
                merged.put_nowait((i, event))
        except Exception:
            log.exception("choice %d failed", i)
            merged.put_nowait((i, Failed("generation failed: internal error")))

    tasks = [asyncio.create_task(pump(i, events)) for i, events in enumerate(streams)]
    left = len(streams)
    try:
        while left:
            i, event = await merged.get()
            if isinstance(event, (Finished, Failed)):
                left -= 1
            yield i, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def served_model(request: web.Request, name: str | None) -> str | web.Response:
    """The model a request names (the first served one when it names none), or the 404 OpenAI answers for a model
    this server does not serve."""
    names = served_names(request.app)
    if name is None:
        return names[0]
    if name in names:
        return name
    message = f"The model '{name}' does not exist; this server serves {', '.join(names)}"
    return error_response(request, 404, message, "model", "model_not_found")


def choice_events(request: web.Request, streams: list[Stream]) -> AsyncGenerator[tuple[int, Event]]:
    """The events of a request's choices as they come, each tagged with its choice's index, timed into the metrics;
    close it (`aclosing`) to stop the readers early."""
    return merge([events_of(request, s) for s in streams])


class Writer(Protocol):
    """A streamed response a door writes its frames on (`sse.EventStream`, Ollama's NDJSON)."""

    response: web.StreamResponse

    async def prepare(self, request: web.Request) -> None: ...

    async def close(self) -> None: ...


async def answer_stream(
    request: web.Request,
    streams: list[Stream],
    out: Writer,
    write: Callable[[AsyncIterator[tuple[int, Event]]], Awaitable[None]],
    what: str,
) -> web.StreamResponse:
    """What every streaming door does around its own frames: the choices' events merged; a plain JSON error when the
    first says the generation never started (nothing is streamed yet, so the status can still say so); else the
    response prepared and `write` given the events; a client that leaves ends it quietly, and the readers stop at
    once, not when the generator is collected. The caller cancels the streams (a client that left stops its
    generation within a step)."""
    merged = choice_events(request, streams)
    try:
        (_, first), events = await peeked(merged)
        if (refused := not_started(request, first)) is not None:
            return refused
        await out.prepare(request)
        await write(events)
    except ClientGone:
        log.info("client went away from %s", what)
    finally:
        await merged.aclose()
    await out.close()
    return out.response
