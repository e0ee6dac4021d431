"""OpenAI legacy completions (`POST /v1/completions`): a raw text prompt continued, no chat template. Several prompts
in one request each get their own `n` choices, numbered prompt by prompt as OpenAI numbers them."""

from __future__ import annotations

import codecs
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from aiohttp import web

from api.completions_schema import LegacyCompletionRequest, parse_legacy_completion
from api.config import BACKEND, CONFIG
from api.errors import failure_response
from api.http import answer_stream, choice_events, openai_usage, read_body, served_model
from backends.base import Delta, Event, Failed, Finished, KeepAlive, Stream
from sse import EventStream, dumps

log = logging.getLogger(__name__)


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions, streaming or not."""
    req = await read_body(request, parse_legacy_completion)
    model = served_model(request, req.model)
    if isinstance(model, web.Response):
        return model
    handles: list[Stream] = []
    try:
        for job in req.jobs(request.app[CONFIG].limits):  # choice i is prompt i // n's, as OpenAI numbers them
            handles += await request.app[BACKEND].open(job)
        base = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        if req.stream:
            return await _stream(request, req, handles, base)
        return await _complete(request, req, handles, base)
    finally:  # also the choices of earlier prompts when a later one is refused
        for h in handles:
            h.cancel()


def _continues(pending: bytes, byte: int) -> bool:
    """Whether a byte goes on with the start of a character that the bytes before it left unfinished."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(pending + bytes([byte]))
    except UnicodeDecodeError:
        return False
    return True


class Offsets:
    """Where each token of a choice starts in its text, in characters, from the tokens' bytes alone: the text is their
    bytes decoded together (a broken character one U+FFFD; a special token, which the text leaves out, has none),
    however it was cut into deltas (the engine sends a token's entry before its text while a stop string may still
    follow). A token that holds part of a character starts where that character does; the text may end before the
    last tokens' bytes (cut at a stop string), their offsets are still where their bytes start. `start`: the
    characters before the answer (an echoed prompt)."""

    def __init__(self, start: int = 0) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._start = start
        self._chars = 0  # the characters the tokens' bytes so far decode to

    def of(self, delta: Delta) -> list[int]:
        """The offsets of a delta's tokens; the count then moves past their bytes."""
        out = []
        for token in delta.logprobs:
            raw = bytes(token.bytes)
            pending = self._decoder.getstate()[0]  # the start of a character the bytes so far left unfinished
            if pending and raw and not _continues(pending, raw[0]):  # the unfinished character is a U+FFFD
                self._chars += len(self._decoder.decode(b"", final=True))
            out.append(self._start + self._chars)
            self._chars += len(self._decoder.decode(raw))
        return out


def _utf8(raw: bytes) -> str | None:
    """Bytes that are UTF-8 on their own, decoded; else (none, or part of a character) None."""
    try:
        return raw.decode() or None
    except UnicodeDecodeError:
        return None


def spelled(text: str, raw: tuple[int, ...]) -> str:
    """A token as legacy logprobs write it: its text, or where its bytes are not UTF-8 on their own (part of a
    character) `bytes:` and their \\x escapes, as OpenAI writes them, so that no two alternatives share a key."""
    if not raw:
        return text
    if (whole := _utf8(bytes(raw))) is not None:
        return whole
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


LOGPROBS_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def logprobs_part(delta: Delta, offsets: Offsets) -> dict[str, list[Any]]:
    """A delta's logprobs in the legacy shape. Each token's alternatives hold the token itself too, as OpenAI's do
    (so `logprobs` of them, or one more where the token is not among the likeliest)."""
    tokens = delta.logprobs
    return {
        "tokens": [spelled(t.token, t.bytes) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [
            {**{spelled(alt.token, alt.bytes): alt.logprob for alt in t.top}, spelled(t.token, t.bytes): t.logprob}
            for t in tokens
        ],
        "text_offset": offsets.of(delta),
    }


def total_usage(done: dict[int, Finished], n: int) -> dict[str, Any] | None:
    """Usage of the whole request: each prompt's tokens once, every choice's tokens; None when the backend reported
    none."""
    if not done or not all(d.usage_known for d in done.values()):
        return None
    first = [d for i, d in sorted(done.items()) if i % n == 0]  # each prompt's first choice: its prompt, once
    return openai_usage(
        replace(
            next(iter(done.values())),
            prompt_tokens=sum(d.prompt_tokens for d in first),
            completion_tokens=sum(d.completion_tokens for d in done.values()),
            cached_tokens=None
            if any(d.cached_tokens is None for d in first)
            else sum(d.cached_tokens or 0 for d in first),
        )
    )


async def _complete(
    request: web.Request, req: LegacyCompletionRequest, handles: list[Stream], base: dict[str, Any]
) -> web.Response:
    texts = [req.prompts[i // req.n] if req.echo else "" for i in range(len(handles))]
    logprobs: list[dict[str, list[Any]]] = [{key: [] for key in LOGPROBS_KEYS} for _ in handles]
    offsets = [Offsets(len(text)) for text in texts]
    done: dict[int, Finished] = {}
    async with aclosing(choice_events(request, handles)) as events:
        async for i, event in events:
            if isinstance(event, Delta):
                texts[i] += event.text
                for key, values in logprobs_part(event, offsets[i]).items():
                    logprobs[i][key] += values
            elif isinstance(event, Failed):
                return failure_response(request, event)
            elif isinstance(event, Finished):
                done[i] = event
    choices = [
        {
            "text": texts[i],
            "index": i,
            "logprobs": logprobs[i] if req.logprobs is not None else None,
            "finish_reason": done[i].reason,
            "stop_reason": done[i].stop_sequence,  # vLLM's: the stop string that ended the choice
        }
        for i in range(len(handles))
    ]
    body: dict[str, Any] = {**base, "choices": choices}
    if (counts := total_usage(done, req.n)) is not None:
        body["usage"] = counts
    return web.json_response(body, dumps=dumps)


def _chunk(base: dict[str, Any], i: int, text: str, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**base, "choices": [{"text": text, "index": i, "logprobs": logprobs, "finish_reason": None}]}


def _last_chunk(base: dict[str, Any], i: int, done: Finished) -> dict[str, Any]:
    choice = {"text": "", "index": i, "logprobs": None, "finish_reason": done.reason, "stop_reason": done.stop_sequence}
    return {**base, "choices": [choice]}


async def _stream(
    request: web.Request, req: LegacyCompletionRequest, handles: list[Stream], base: dict[str, Any]
) -> web.StreamResponse:
    out = EventStream()
    done: dict[int, Finished] = {}
    offsets = [Offsets(len(req.prompts[i // req.n]) if req.echo else 0) for i in range(len(handles))]

    async def write(events: AsyncIterator[tuple[int, Event]]) -> None:
        if req.echo:
            for i in range(len(handles)):
                await out.send_json(_chunk(base, i, req.prompts[i // req.n]))
        async for i, event in events:
            if isinstance(event, KeepAlive):
                await out.ping()
            elif isinstance(event, Delta) and (event.text or event.logprobs):
                logprobs = logprobs_part(event, offsets[i]) if req.logprobs is not None else None
                await out.send_json(_chunk(base, i, event.text, logprobs))
            elif isinstance(event, Finished):
                done[i] = event
                await out.send_json(_last_chunk(base, i, event))
            elif isinstance(event, Failed):
                error = {"message": event.message, "type": event.type, "param": None, "code": None}
                await out.send_json({"error": error})
                break
        else:
            if req.include_usage and (totals := total_usage(done, req.n)) is not None:
                await out.send_json({**base, "choices": [], "usage": totals})
        await out.send("[DONE]")

    return await answer_stream(request, handles, out, write, base["id"])


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
