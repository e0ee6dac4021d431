"""The Ollama API (`/api/...`): `GET /api/version`, `/api/tags`, `/api/ps`, `POST /api/show`, `/api/chat` and
`/api/generate`, as the official `ollama` clients speak it. Answers stream as NDJSON (one JSON object a line, the last
with `done: true`) unless `stream` is false; errors are `{"error": "..."}` with the status that fits.

Like the other doors it owns no generation: a body becomes a ChatJob, the backend's events become Ollama's objects.
What this server cannot be is said, not faked: no `context` array in /api/generate's answer (send a conversation to
/api/chat), no model files, no digests, and sizes only where the backend reports them."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from api.config import BACKEND, CONFIG, ERROR_SHAPES, STATS
from api.errors import failure_response
from api.http import answer_stream, choice_events, read_body, served_names
from api.ollama_schema import OllamaRequest, parse_chat, parse_generate, parse_show
from api.tool_fields import arguments_object
from backends.base import (
    BackendError,
    CallDelta,
    ChatJob,
    Delta,
    Event,
    Failed,
    Finished,
    InvalidField,
    KeepAlive,
    Sampling,
    SamplingDefaults,
    Stream,
    TokenLogprob,
    ToolChoice,
)
from sse import StreamWriter, dumps

log = logging.getLogger(__name__)

OLLAMA_VERSION = "0.12.0"  # the Ollama API this door speaks, as /api/version reports it to clients that check
# Ollama's own defaults, for models whose family brings none
OLLAMA_DEFAULTS = SamplingDefaults(temperature=0.8, top_p=0.9, top_k=40)
# /api/ps's expiry: the model never unloads while the server runs, so the last moment a date can name
NEVER = "9999-12-31T23:59:59Z"
NDJSON_HEADERS = {
    "Content-Type": "application/x-ndjson",
    "Cache-Control": "no-cache",
    # nginx buffers proxied responses unless told not to
    "X-Accel-Buffering": "no",
}


def ollama_error(status: int, message: str, param: str | None, code: str | None) -> dict[str, Any]:
    """Ollama's error body: the message alone (a 400's names the field it is about)."""
    return {"error": message}


class NdjsonStream(StreamWriter):
    """An application/x-ndjson response: one compact JSON object a line."""

    def __init__(self) -> None:
        super().__init__(NDJSON_HEADERS)

    async def send(self, obj: dict[str, Any]) -> None:
        """Send one object as a line."""
        await self.write((dumps(obj) + "\n").encode())


def rfc3339(at: float | None = None) -> str:
    """A time as Ollama writes it: RFC 3339 in UTC; now unless `at` (seconds since the epoch)."""
    moment = datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def tagged(name: str) -> str:
    """A served name as Ollama lists it: with a tag, `:latest` unless it has one."""
    return name if ":" in name.rpartition("/")[2] else f"{name}:latest"


def served(app: web.Application, sent: str) -> str | None:
    """The served name a client's name means (Ollama's `tiny` is `tiny:latest`), or None."""
    return next((name for name in served_names(app) if sent in (name, tagged(name))), None)


def not_found(app: web.Application, sent: str) -> BackendError:
    """Ollama's 404 for a model it does not have, with the names this server serves."""
    names = ", ".join(tagged(n) for n in served_names(app))
    return BackendError(404, f'model "{sent}" not found; this server serves {names}')


# ---- what the backend reports of its model --------------------------------------------------------------------------


def _about(app: web.Application) -> dict[str, Any]:
    return app[BACKEND].describe()[1]


def _quantization(about: dict[str, Any]) -> str:
    """Ollama's quantization_level from the weights' bits or dtype (F16, BF16, F32; Q8, Q4); empty when unknown."""
    bits, dtype = about.get("bits"), about.get("dtype")
    if isinstance(bits, int) and bits < 16:
        return f"Q{bits}"
    return {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}.get(str(dtype).removeprefix("torch."), "")


def _details(about: dict[str, Any]) -> dict[str, Any]:
    """Ollama's model details: what the backend knows, empty strings for the rest (no parameter count is guessed)."""
    family = str(about.get("architecture") or "")  # the local model's model_type; an upstream reports none
    return {
        "parent_model": "",
        "format": "",
        "family": family,
        "families": [family] if family else [],
        "parameter_size": "",
        "quantization_level": _quantization(about),
    }


def _listed(app: web.Application, name: str, about: dict[str, Any]) -> dict[str, Any]:
    """A model as /api/tags lists it."""
    size = about.get("weight_bytes")
    return {
        "name": tagged(name),
        "model": tagged(name),
        "modified_at": rfc3339(app[BACKEND].started_at),
        "size": size if isinstance(size, int) else 0,
        "digest": "",
        "details": _details(about),
    }


async def _context_length(app: web.Application, about: dict[str, Any]) -> int | None:
    """The model's context length: the backend's report, else what tokenizing an empty prompt says of it (an
    upstream's max_model_len); None when neither knows."""
    if isinstance(length := about.get("context_length"), int):
        return length
    job = ChatJob((), Sampling(), OLLAMA_DEFAULTS, limits=app[CONFIG].limits, prompt="")
    try:
        return (await app[BACKEND].tokenize(job)).context_length
    except (InvalidField, BackendError) as exc:
        log.info("no context length for /api/show: %s", exc)
        return None


async def version(request: web.Request) -> web.Response:
    """GET /api/version."""
    return web.json_response({"version": OLLAMA_VERSION})


async def tags(request: web.Request) -> web.Response:
    """GET /api/tags: each served name."""
    about = _about(request.app)
    return web.json_response({"models": [_listed(request.app, n, about) for n in served_names(request.app)]})


async def running(request: web.Request) -> web.Response:
    """GET /api/ps: the model, loaded for as long as the server runs; on an accelerator unless its device is the CPU
    (size_vram 0 then)."""
    about = _about(request.app)
    length = await _context_length(request.app, about)
    on_accelerator = not str(about.get("device", "cpu")).startswith("cpu")
    models = []
    for name in served_names(request.app):
        model = _listed(request.app, name, about)
        model.update(expires_at=NEVER, size_vram=model["size"] if on_accelerator else 0)
        if length is not None:
            model["context_length"] = length
        models.append(model)
    return web.json_response({"models": models})


async def show(request: web.Request) -> web.Response:
    """POST /api/show: what is known of a served model. Its capabilities add "tools" where the backend says the
    model has a tool-call format (a local model); an upstream does not say, and a tool conversation is passed on to it
    all the same."""
    sent = await read_body(request, parse_show)
    if served(request.app, sent) is None:
        raise not_found(request.app, sent)
    about = _about(request.app)
    details = _details(about)
    arch = details["family"]
    info: dict[str, Any] = {"general.architecture": arch}
    if (length := await _context_length(request.app, about)) is not None:
        # Ollama's key is "<architecture>.context_length"; with none reported, "general." stands in for it
        info[f"{arch or 'general'}.context_length"] = length
    body = {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": details,
        "model_info": info,
        "capabilities": ["completion", "tools"] if about.get("tool_calls") else ["completion"],
        "modified_at": rfc3339(request.app[BACKEND].started_at),
    }
    return web.json_response(body)


# ---- answers: /api/chat and /api/generate ---------------------------------------------------------------------------


@dataclass
class Answer:
    """One answer as it comes: its text, calls and logprobs, and when its generation reached each stage."""

    chat: bool  # /api/chat's `message`, else /api/generate's `response`
    model: str  # the name as sent: Ollama echoes it
    logprobs: bool
    started: float  # perf_counter: the request arrived
    opened: float = field(default_factory=time.perf_counter)
    first: float | None = None  # the first token came
    calls: list[dict[str, Any]] = field(default_factory=list)  # name and arguments text of each call so far

    def take(self, delta: Delta) -> None:
        """A delta's timing and calls (its text and logprobs go out as they come, or are gathered by the caller)."""
        if self.first is None:
            self.first = time.perf_counter()
        for piece in delta.calls:
            add_call(self.calls, piece)

    def part(self, text: str, logprobs: Sequence[TokenLogprob] = (), calls: bool = False) -> dict[str, Any]:
        """An answer object: text (a stream's piece, or the whole), with the calls at the end."""
        out: dict[str, Any] = {"model": self.model, "created_at": rfc3339()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls and self.calls:
                message["tool_calls"] = [ollama_call(c) for c in self.calls]
            out["message"] = message
        else:
            out["response"] = text
        if self.logprobs:
            out["logprobs"] = logprobs_part(logprobs)
        return out

    def done(self, finished: Finished) -> dict[str, Any]:
        """The fields that end an answer: why, the token counts, and the measured durations in nanoseconds (prefill:
        from the start of the generation to its first token, less its wait in the queue)."""
        now = time.perf_counter()
        first = now if self.first is None else self.first
        out: dict[str, Any] = {
            "done": True,
            "done_reason": "length" if finished.reason == "length" else "stop",  # Ollama's for a call too
            "total_duration": _ns(now - self.started),
            "load_duration": 0,  # the model is loaded before the server takes requests
            "prompt_eval_duration": _ns(max(0.0, first - self.opened - finished.queue_s)),
            "eval_duration": _ns(now - first),
        }
        if finished.usage_known:
            out.update(prompt_eval_count=finished.prompt_tokens, eval_count=finished.completion_tokens)
        return out


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def add_call(calls: list[dict[str, Any]], piece: CallDelta) -> None:
    """A call's streamed piece into the calls of an answer."""
    if piece.id is not None:
        calls.append({"name": piece.name, "arguments": ""})
    calls[piece.index]["arguments"] += piece.arguments


def ollama_call(call: dict[str, Any]) -> dict[str, Any]:
    """A whole call as Ollama sends it: its arguments as a JSON object."""
    return {"function": {"name": call["name"], "arguments": arguments_object(call["arguments"])}}


def logprobs_part(tokens: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """Tokens' logprobs in Ollama's shape."""
    return [
        {
            "token": t.token,
            "logprob": t.logprob,
            "top_logprobs": [{"token": top.token, "logprob": top.logprob} for top in t.top],
        }
        for t in tokens
    ]


def _load_answer(chat: bool, model: str, unload: bool) -> web.Response:
    """Ollama's answer to a request with nothing to say (it loads the model, or with keep_alive 0 unloads it): done at
    once, nothing generated. The model stays loaded here either way: it is the server's only one."""
    said = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    reason = "unload" if unload else "load"
    return web.json_response({"model": model, "created_at": rfc3339(), **said, "done": True, "done_reason": reason})


async def _answer(request: web.Request, req: OllamaRequest, chat: bool) -> web.StreamResponse:
    """Check the model and the length, start the generation, and answer: a stream or one object."""
    if served(request.app, req.model) is None:
        raise not_found(request.app, req.model)
    limit = request.app[CONFIG].limits.max_tokens_limit
    if req.sampling.max_tokens is not None and req.sampling.max_tokens > limit:
        raise InvalidField(
            "options.num_predict", f"'options.num_predict' is {req.sampling.max_tokens}; this server allows {limit}"
        )
    if not req.messages and req.prompt is None:
        return _load_answer(chat, req.model, req.unload)
    job = ChatJob(
        req.messages,
        req.sampling,
        OLLAMA_DEFAULTS,
        limits=request.app[CONFIG].limits,
        tools=req.tools,
        tool_choice=ToolChoice("auto" if req.tools else "none"),
        prompt=req.prompt,
        prompt_param="messages" if chat else "prompt",
        template_param="messages" if chat else "prompt",
    )
    answer = Answer(chat, req.model, req.logprobs, request[STATS].started)
    (stream,) = await request.app[BACKEND].open(job)
    try:
        if req.stream:
            return await _stream(request, stream, answer)
        return await _complete(request, stream, answer)
    finally:
        stream.cancel()


async def _complete(request: web.Request, stream: Stream, answer: Answer) -> web.Response:
    text: list[str] = []
    tokens: list[TokenLogprob] = []
    async with aclosing(choice_events(request, [stream])) as events:
        async for _, event in events:
            if isinstance(event, Delta):
                answer.take(event)
                text.append(event.text)
                tokens += event.logprobs
            elif isinstance(event, Failed):
                return failure_response(request, event)
            elif isinstance(event, Finished):
                return web.json_response(
                    {**answer.part("".join(text), tokens, calls=True), **answer.done(event)}, dumps=dumps
                )
    raise AssertionError("a generation's events end with Finished or Failed")


async def _stream(request: web.Request, stream: Stream, answer: Answer) -> web.StreamResponse:
    out = NdjsonStream()

    async def write(rest: AsyncIterator[tuple[int, Event]]) -> None:
        async for _, event in rest:
            if isinstance(event, KeepAlive):
                continue  # NDJSON has no comment line; a client that left is noticed by events_of all the same
            if isinstance(event, Delta):
                answer.take(event)
                if event.text or (answer.logprobs and event.logprobs):
                    await out.send({**answer.part(event.text, event.logprobs), "done": False})
            elif isinstance(event, Finished):
                await out.send({**answer.part("", calls=True), **answer.done(event)})
            elif isinstance(event, Failed):
                await out.send({"error": event.message})
                break

    return await answer_stream(request, [stream], out, write, "an Ollama stream")


async def chat(request: web.Request) -> web.StreamResponse:
    """POST /api/chat."""
    return await _answer(request, await read_body(request, parse_chat), chat=True)


async def generate(request: web.Request) -> web.StreamResponse:
    """POST /api/generate: a prompt through the chat template (after `system`), or `raw`. The last object carries
    no `context` array: this server keeps no conversation state; send a conversation to /api/chat."""
    return await _answer(request, await read_body(request, parse_generate), chat=False)


def add_routes(app: web.Application) -> None:
    app[ERROR_SHAPES]["/api"] = ollama_error
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", running)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
