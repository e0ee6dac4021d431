"""OpenAI legacy completions (`POST /v1/completions`): a raw text prompt continued, no chat template. Several prompts
in one request each get their own `n` choices, numbered prompt by prompt as OpenAI numbers them."""

from __future__ import annotations

import codecs
import logging
import time
import uuid
from contextlib import aclosing
from typing import Any

from aiohttp import web

from api.completions_schema import LegacyCompletionRequest, parse_legacy_completion
from api.config import BACKEND, CONFIG
from api.errors import failure_response, not_started
from api.http import OPENAI_DEFAULTS, events_of, merge, peeked, read_body, served_model
from backends.base import ChatJob, Delta, Failed, Finished, KeepAlive, Stream
from sse import ClientGone, EventStream, dumps

log = logging.getLogger(__name__)


def raw_job(request: web.Request, prompt: str, req: LegacyCompletionRequest) -> ChatJob:
    """The job of one prompt: its text as it is, errors about it blamed on `prompt`."""
    return ChatJob(
        (),
        req.sampling,
        OPENAI_DEFAULTS,
        n=req.n,
        limits=request.app[CONFIG].limits,
        prompt_param="prompt",
        template_param="prompt",
        prompt=prompt,
    )


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions, streaming or not."""
    req = await read_body(request, parse_legacy_completion)
    model = served_model(request, req.model)
    if isinstance(model, web.Response):
        return model
    handles: list[Stream] = []
    try:
        for prompt in req.prompts:  # choice i is prompt i // n's: the order OpenAI numbers them in
            handles += await request.app[BACKEND].open(raw_job(request, prompt, req))
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


class Offsets:
    """Where each token of a choice starts in its text, in characters. The text is the tokens' bytes decoded together,
    so a token's own characters end its piece of the text; before them may stand the U+FFFD of an earlier token's
    broken bytes, which only this token showed to be broken. A token that holds part of a character (a byte of an
    emoji) starts where that character does; one the text leaves out (a special token) where it would have been. Each
    delta's text is counted whole, so a token that cannot be placed misplaces nothing after its delta."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def of(self, delta: Delta) -> list[int]:
        """The offsets of a delta's tokens; the count then moves past its text."""
        out, at = [], 0
        for token in delta.logprobs:
            piece = self._decoder.decode(bytes(token.bytes) if token.bytes else token.token.encode())
            if not delta.text.startswith(piece, at):  # not in the text
                out.append(self._chars + at)
                continue
            own = len(token.token) if token.token and piece.endswith(token.token) else len(piece)
            out.append(self._chars + at + len(piece) - own)
            at += len(piece)
        if at != len(delta.text):  # placed wrong: start the next delta afresh
            self._decoder.reset()
        self._chars += len(delta.text)
        return out


LOGPROBS_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def logprobs_part(delta: Delta, offsets: Offsets) -> dict[str, list[Any]]:
    """A delta's logprobs in the legacy shape. Each token's alternatives hold the token itself too, as OpenAI's do
    (so up to logprobs + 1 of them)."""
    tokens = delta.logprobs
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{**{alt.token: alt.logprob for alt in t.top}, t.token: t.logprob} for t in tokens],
        "text_offset": offsets.of(delta),
    }


def total_usage(done: dict[int, Finished], n: int) -> dict[str, int] | None:
    """Usage of the whole request: each prompt's tokens once, every choice's tokens; None when the backend reported
    none."""
    if not done or not all(d.usage_known for d in done.values()):
        return None
    prompt_tokens = sum({i // n: d.prompt_tokens for i, d in done.items()}.values())
    completion_tokens = sum(d.completion_tokens for d in done.values())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _complete(
    request: web.Request, req: LegacyCompletionRequest, handles: list[Stream], base: dict[str, Any]
) -> web.Response:
    texts = [req.prompts[i // req.n] if req.echo else "" for i in range(len(handles))]
    logprobs: list[dict[str, list[Any]]] = [{key: [] for key in LOGPROBS_KEYS} for _ in handles]
    offsets = [Offsets() for _ in handles]
    done: dict[int, Finished] = {}
    async with aclosing(merge([events_of(request, h) for h in handles])) as events:
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
    offsets = [Offsets() for _ in handles]
    merged = merge([events_of(request, h) for h in handles])
    try:
        (_, first), events = await peeked(merged)
        if (refused := not_started(request, first)) is not None:
            return refused
        await out.prepare(request)
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
    except ClientGone:
        log.info("client went away from %s", base["id"])
    finally:
        await merged.aclose()  # its readers stop now, not when the generator is collected
    await out.close()
    return out.response


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
