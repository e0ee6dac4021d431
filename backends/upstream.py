"""The upstream backend: answers streamed from an OpenAI-compatible inference engine (vLLM, TGI, llama.cpp's
server, another instance of this one) instead of a local model. Auth, limits, metrics, both APIs and the web UI stay
here; batching and parallelism are the upstream's.

Whatever the upstream sends is checked before it reaches a client: a malformed chunk ends the answer with an error at
once, its error texts arrive cleaned and cut short, and this server's credentials (the api key, those in `--upstream`)
never appear in an answer, on /health or in the log, even where the upstream quotes them."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any, TypeVar

import aiohttp
from aiohttp.http_exceptions import LineTooLong
from yarl import URL

from backends.base import BackendError, CallDelta, ChatJob, Constraint, Message, Stream, Tokens, ToolChoice
from backends.limits import check_limits
from backends.upstream_checks import (
    CallChunk,
    ChoiceChunk,
    ErrorChunk,
    MalformedChunk,
    Secrets,
    clean,
    clean_text,
    exception_text,
    model_names,
    parse_chunk,
    read_head,
    refusal_message,
)
from generation.events import Delta, Failed, Finished, RequestHandle, TokenLogprob
from models.tools.base import call_id

log = logging.getLogger(__name__)
T = TypeVar("T")

PROBE_EVERY = 2.0  # seconds between checks that the upstream answers
ANSWER_BYTES = 16 << 20  # the most of a /tokenize or /detokenize answer read: a whole context's ids fit
REFUSED_CREDENTIALS = "the upstream refused this server's credentials (check --upstream-api-key)"
# the upstream's 4xx that are about the client's request, passed on as they are; any other is about how this server
# asks it (a wrong --upstream path or --upstream-model: 404; a proxy that wants credentials: 407), a 502
CLIENTS_FAULT = frozenset({400, 413, 422})
REJECTED = "the upstream %s rejected a request (%d; check --upstream and --upstream-model): %s"  # for the log


@dataclass(frozen=True)
class UpstreamConfig:
    """Where the upstream is and how to talk to it."""

    # its OpenAI base URL, ending in /v1; user:password@ in it means HTTP Basic auth (neither secret is in the repr)
    url: str = field(repr=False)
    api_key: str | None = field(default=None, repr=False)
    model: str | None = None  # the name to ask it for; default: the first it lists
    connect_timeout: float = 10.0
    read_timeout: float = 600.0  # the longest silence mid-answer before the stream counts as broken


# ---- one request ---------------------------------------------------------------------------------


class UpstreamHandle(RequestHandle):
    """One choice of an upstream request; cancelling it closes that request at once."""

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop, call: _Call) -> None:
        super().__init__(request_id, loop)
        self._call = call

    def cancel(self) -> None:
        super().cancel()
        self._call.stop()


class _Call:
    """One streamed request to the upstream, serving all `n` choices of a job."""

    def __init__(
        self, response: aiohttp.ClientResponse, url: str, secrets: Secrets, alternatives: int | None = None
    ) -> None:
        self.response = response
        # how many alternatives each token's logprobs may carry (None: as the upstream sends them); the legacy API
        # lists the sampled token among its top_logprobs besides the k asked for: the likeliest k are kept, as a
        # local model gives them
        self.alternatives = alternatives
        self.url = url  # for the log: without credentials
        self.secrets = secrets
        self.handles: list[UpstreamHandle] = []
        self.task: asyncio.Task[None] | None = None
        self.ended = False  # every choice has had its last event
        self._held: dict[int, tuple[TokenLogprob, ...]] = {}  # by choice: logprobs of tokens whose text is to come
        self._calls: dict[int, _Calls] = {}  # by choice: the tool calls its answer has begun
        self._stops: dict[int, str] = {}  # by choice: the stop string that ended it, where the upstream said

    def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def fail(self, message: str, kind: str = "upstream_error") -> None:
        """End every choice with this error, unless the call has ended already."""
        if self.ended:
            return
        self.ended = True
        for h in self.handles:
            h.deliver(Failed(message, kind))

    def finish(self, reasons: dict[int, str], usage: tuple[int, int, int | None] | None) -> None:
        """End every choice as the upstream ended it; one it left without a finish reason broke off."""
        if self.ended:
            return
        self.ended = True
        for i, h in enumerate(self.handles):
            if i not in reasons:
                h.deliver(Failed("the upstream ended the stream before the answer", "upstream_error"))
            elif usage is None:
                h.deliver(Finished(reasons[i], 0, 0, usage_known=False, stop_sequence=self._stops.get(i)))
            else:  # the upstream counts all choices together: the first carries them
                prompt, completion, cached = usage
                h.deliver(
                    Finished(
                        reasons[i],
                        prompt,
                        completion if i == 0 else 0,
                        stop_sequence=self._stops.get(i),
                        cached_tokens=cached,
                    )
                )

    async def pump(self) -> None:
        """Read the upstream's chunks into each choice's queue; end every choice exactly once, whatever happens."""
        try:
            reasons, usage = await self._read()
        except asyncio.CancelledError:
            self.fail("the client closed the request", "cancelled")
            raise
        except ErrorChunk as exc:
            log.warning("the upstream %s reported an error mid-answer: %s", self.url, exc)
            self.fail(f"the upstream failed mid-answer: {exc}")
        except MalformedChunk as exc:
            message = clean(str(exc), secrets=self.secrets)  # our words, with the upstream's numbers in some
            data = self.secrets.scrub_bytes(exc.data)[:200]  # scrubbed whole: the cut could leave half a secret
            log.warning("the upstream %s sent a malformed chunk (%s): %r", self.url, message, data)
            self.fail(f"the upstream sent a malformed chunk: {message}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("the upstream %s broke off an answer: %s", self.url, exception_text(exc, self.secrets))
            self.fail(f"the upstream stream broke: {exception_text(exc, self.secrets)}")
        except Exception:  # a bug of ours: the choices still end, the details go to the log
            log.exception("reading an answer from the upstream %s failed", self.url)
            self.fail("internal server error", "server_error")
        else:
            self.finish(reasons, usage)

    async def _read(self) -> tuple[dict[int, str], tuple[int, int, int | None] | None]:
        """Deliver the text of each chunk as it comes, until `[DONE]` or the end; the finish reasons and usage."""
        reasons: dict[int, str] = {}
        usage: tuple[int, int, int | None] | None = None
        async with self.response:
            try:
                async for raw in self.response.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):  # comments, `event:` and `id:` fields
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    chunk = parse_chunk(data, self.secrets)
                    usage = chunk.usage if chunk.usage is not None else usage
                    for choice in chunk.choices:
                        self._take(choice, reasons, data)
            except LineTooLong as exc:
                raise MalformedChunk("a line longer than the client reads", bytes(exc.args[0])) from exc
        return reasons, usage

    def _take(self, choice: ChoiceChunk, reasons: dict[int, str], data: bytes) -> None:
        if not 0 <= choice.index < len(self.handles):
            raise MalformedChunk(f"choice {choice.index} was not asked for", data)
        logprobs = self._held.pop(choice.index, ()) + tuple(map(self._likeliest, choice.logprobs))
        calls = self._calls.setdefault(choice.index, _Calls()).take(choice.calls, data) if choice.calls else ()
        if choice.text or calls or (logprobs and choice.finish_reason):
            self.handles[choice.index].deliver(Delta(choice.text, logprobs, calls))
        elif logprobs:  # a token that is part of a character (vLLM sends no text for it): as a local model's, its
            self._held[choice.index] = logprobs  # entry comes with the text it makes
        if choice.finish_reason:
            reasons[choice.index] = choice.finish_reason
            if choice.stop is not None:
                self._stops[choice.index] = choice.stop

    def _likeliest(self, entry: TokenLogprob) -> TokenLogprob:
        if self.alternatives is None or len(entry.top) <= self.alternatives:
            return entry
        top = sorted(entry.top, key=lambda t: -t.logprob)[: self.alternatives]
        return TokenLogprob(entry.token, entry.logprob, entry.bytes, tuple(top))

    def close(self) -> None:
        """Once the pump is done: end choices it never reached (cancelled before it ran) and free the connection."""
        self.fail("the client closed the request", "cancelled")
        self.response.close()  # no-op after a release


class _Calls:
    """The tool calls of one choice's answer, as the upstream streams them, renumbered 0, 1, ... in the order they
    begin (the doors index an answer's calls by that number, whatever numbers the upstream used). A call begins with
    a piece that names its function, under a number the upstream has not used yet or with an id other than the one
    that number had (a server that numbers every call 0); without an id, it gets one. The pieces after it under its
    number add to its arguments."""

    def __init__(self) -> None:
        self._count = 0
        self._begun: dict[int, tuple[int, str, str]] = {}  # the upstream's number -> (ours, id, name)

    def take(self, pieces: tuple[CallChunk, ...], data: bytes) -> tuple[CallDelta, ...]:
        out: list[CallDelta] = []
        for piece in pieces:
            known = self._begun.get(piece.index)
            if known is None or (piece.id is not None and piece.id != known[1]):
                if piece.name is None:
                    raise MalformedChunk("a tool call's first piece names no function", data)
                ours, made, self._count = self._count, piece.id or call_id(), self._count + 1
                self._begun[piece.index] = (ours, made, piece.name)
                out.append(CallDelta(ours, piece.arguments, made, piece.name))
            elif piece.name is not None and piece.name != known[2]:
                raise MalformedChunk("a tool call's function changed its name mid-call", data)
            elif piece.arguments:
                out.append(CallDelta(known[0], piece.arguments))
        return tuple(out)


# ---- the upstream's routes beside its OpenAI ones ---------------------------------------------------------------


class Unusable(ValueError):
    """An answer of /tokenize or /detokenize that is JSON, but not what the route answers; says what it lacks."""


def _token_ids(answer: Any) -> tuple[tuple[int, ...], int | None]:
    """/tokenize's ids and context length (vLLM's `max_model_len`; None when it says none)."""
    if not isinstance(answer, dict):
        raise Unusable("no JSON object")
    ids, length = answer.get("tokens"), answer.get("max_model_len")
    if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        raise Unusable("no list of token ids")
    known = isinstance(length, int) and not isinstance(length, bool) and length > 0
    return tuple(ids), length if known else None


def _detokenized(answer: Any) -> str:
    """/detokenize's text: vLLM's `prompt`, llama.cpp's `content`."""
    text = answer.get("prompt", answer.get("content")) if isinstance(answer, dict) else None
    if not isinstance(text, str):
        raise Unusable("no text")
    return clean_text(text)


# ---- the backend ---------------------------------------------------------------------------------


def _parsed(url: str) -> URL | None:
    try:
        return URL(url)
    except ValueError:  # a port past 65535, a port that is no number (a raw / in a password ends the host early)
        return None


def _unnamed(parsed: URL) -> str:
    """A parsed URL without yarl's user:password@ (with_user raises on a URL with no host: it has none then)."""
    return str(parsed) if parsed.raw_user is None and parsed.raw_password is None else str(parsed.with_user(None))


def _without_credentials(url: str) -> str:
    """The URL to request, show and log: yarl's user:password@ left out (requested without them, they cannot leak
    into aiohttp's exception texts either). Where an @ is still in it, yarl did not see the credentials (a raw / in
    the password ends the authority early, and a /, ? or # could be anywhere in it): everything from :// to the last
    @ is hidden."""
    parsed = _parsed(url)
    text = url if parsed is None else _unnamed(parsed)
    if (at := text.rfind("@")) >= 0:
        scheme_end = text.find("://", 0, at)
        start = scheme_end + 3 if scheme_end >= 0 else 0
        text = text[:start] + "***" + text[at:]
    return text.rstrip("/")


def url_problem(url: str) -> str | None:
    """Why this server cannot use `url` as its upstream, in one line that quotes no part of it (whatever part of it
    is a password); None when it can."""
    parsed = _parsed(url)
    if "@" in url and (parsed is None or "@" in _unnamed(parsed)):
        return (
            "the upstream URL has an @ that does not end a user:password@ before its host: percent-encode its "
            "credentials (a / as %2F, an @ as %40, a : as %3A)"
        )
    if parsed is None:
        return "the upstream URL cannot be parsed (check its host and port)"
    if parsed.scheme not in ("http", "https"):  # never quoted: in `user:password@host` the user is the scheme
        return "the upstream URL must start with http:// or https://"
    if not parsed.host:
        return "the upstream URL names no host"
    if parsed.user and ":" in parsed.user:
        return "the upstream URL's user name holds a : (%3A), which HTTP Basic auth cannot send"
    return None


def _credentials(config: UpstreamConfig) -> tuple[str | None, Secrets]:
    """The Basic auth value for the URL's user:password@ (None without one, or in a URL it cannot use: never sent),
    and what this server sends the upstream and must never pass on: the key, the password (as given and decoded),
    that value and its base64 token."""
    parsed = None if url_problem(config.url) else URL(config.url)
    if parsed is None or (parsed.raw_user is None and parsed.raw_password is None):
        return None, Secrets.of(config.api_key)
    basic = aiohttp.encode_basic_auth(parsed.user or "", parsed.password or "")
    return basic, Secrets.of(config.api_key, parsed.password, parsed.raw_password, basic, basic.split(" ", 1)[1])


def _constraint(constraint: Constraint | None) -> dict[str, Any]:
    """A constraint in the fields upstreams take: a JSON answer as OpenAI's response_format, regex, choice and
    grammar as vLLM's structured_outputs. The job does not keep the client's schema name: every schema is named
    "response". Strict: a local model always holds its answer to the schema, so the upstream is asked to as well."""
    if constraint is None:
        return {}
    if constraint.kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if constraint.kind == "json_schema":
        schema = {"name": "response", "schema": json.loads(constraint.source), "strict": True}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    if constraint.kind == "choice":
        return {"structured_outputs": {"choice": json.loads(constraint.source)}}
    return {"structured_outputs": {constraint.kind: constraint.source}}  # regex, grammar: vLLM names them so


def _messages(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """The conversation in OpenAI's shape: an assistant's calls with it (its content null when it only called), a
    tool result with the id of its call. A legacy function result names no call: it answers the last call of its
    function before it."""
    out: list[dict[str, Any]] = []
    last: dict[str, str] = {}  # the id of each function's last call so far
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "assistant" and m.tool_calls:
            message["content"] = m.content or None
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls
            ]
            last.update((c.name, c.id) for c in m.tool_calls)
        elif m.role == "tool":
            answered = m.tool_call_id or last.get(m.name or "")
            if answered is not None:
                message["tool_call_id"] = answered
            if m.name is not None:
                message["name"] = m.name
        out.append(message)
    return out


def _tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if choice.mode == "function":
        return {"type": "function", "function": {"name": choice.name}}
    return choice.mode  # none, auto, required


def _tools(job: ChatJob) -> dict[str, Any]:
    """The tools as the client sent them (each function object as it came), the choice among them, and whether an
    answer may make more than one call (said only when it may not: the upstream's default is that it may)."""
    if not job.tools:
        return {}
    fields: dict[str, Any] = {
        "tools": [{"type": "function", "function": json.loads(t.spec)} for t in job.tools],
        "tool_choice": _tool_choice(job.tool_choice),
    }
    if not job.tool_choice.parallel:
        fields["parallel_tool_calls"] = False
    return fields


class UpstreamBackend:
    """Streams every job from an OpenAI-compatible upstream through one pooled aiohttp session."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.url = _without_credentials(config.url)
        # a URL it cannot use (the server refuses one at start-up) is never requested: each request says why
        self._problem = url_problem(config.url)
        self._basic_auth, self._secrets = _credentials(config)
        self.started_at = time.time()
        self._session: aiohttp.ClientSession | None = None
        self._calls: set[_Call] = set()
        self._ids = count(1)
        self._models: tuple[str, ...] = ()
        self._reachable: str | None = "not checked yet"  # None when the last check answered, else why not
        self._prober: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._session is not None and not self._session.closed

    @property
    def counts(self) -> tuple[int, int]:
        return sum(len(c.handles) for c in self._calls), 0

    def _headers(self) -> dict[str, str]:
        """The api key as a bearer token, else the URL's credentials as Basic auth (aiohttp deprecates BasicAuth)."""
        if self.config.api_key:
            return {"Authorization": f"Bearer {self.config.api_key}"}
        return {"Authorization": self._basic_auth} if self._basic_auth else {}

    async def start(self) -> None:
        if self.config.api_key and self._basic_auth:
            log.warning("the upstream's api key is set: the credentials in the --upstream URL are not sent")
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.config.connect_timeout, sock_read=self.config.read_timeout
        )
        self._session = aiohttp.ClientSession(timeout=timeout, headers=self._headers())
        if self._problem is not None:
            self._reachable = self._problem
            log.warning("the upstream %s cannot be used (%s); every request will fail", self.url, self._problem)
            return
        await self._probe()
        if self._reachable is not None:
            log.warning("the upstream %s cannot serve yet (%s); serving anyway", self.url, self._reachable)
        self._prober = asyncio.create_task(self._probe_forever())

    async def _probe(self) -> None:
        """Ask the upstream for its models: whether it answers, and the names it serves."""
        assert self._session is not None
        try:
            async with self._session.get(f"{self.url}/models", timeout=aiohttp.ClientTimeout(total=3)) as resp:
                if resp.status in (401, 403):
                    self._reachable = f"it refused this server's credentials ({resp.status})"
                    return
                if resp.status != 200:
                    self._reachable = f"GET /models answered {resp.status}"
                    return
                body = await resp.json()
            self._models = model_names(body)
            self._reachable = None
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as exc:
            self._reachable = clean(f"{type(exc).__name__}: {exc}", secrets=self._secrets).rstrip(": ")

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(PROBE_EVERY)
            try:
                await self._probe()
            except Exception:  # a bug of ours must not end the checks: /health would stay as it was forever
                log.exception("checking the upstream %s failed", self.url)

    async def stop(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self._calls and time.monotonic() < deadline:  # noqa: ASYNC110 - calls end on their own tasks
            await asyncio.sleep(0.05)
        for call in list(self._calls):
            call.fail("the server is shutting down", "unavailable")
            call.stop()
        if self._prober is not None:
            self._prober.cancel()
        if self._session is not None:
            await self._session.close()

    async def ready(self) -> BaseException | None:
        return None  # nothing to load: an upstream that is down gets its own answer per request

    def names(self) -> tuple[str, ...]:
        if self.config.model:
            return (self.config.model,)
        return self._models[:1] or ("upstream",)

    def describe(self) -> tuple[str, dict[str, Any]]:
        about: dict[str, Any] = {"upstream": self.url, "upstream_status": self._reachable or "ok"}
        return ("ok" if self._reachable is None else "unavailable"), about

    async def clear(self) -> dict[str, Any]:
        return {"note": "no local model: the upstream manages its own memory"}

    def _body(self, job: ChatJob) -> dict[str, Any]:
        """The OpenAI request for a job (chat completions; legacy completions for a raw prompt): every sampling field
        the client set passes through, its constraint and its tools."""
        s = job.sampling
        max_tokens = s.max_tokens or job.limits.default_max_tokens
        check_limits(job.limits, s.max_tokens, 0, job.prompt_param)
        prompt = {"messages": _messages(job.messages)} if job.prompt is None else {"prompt": job.prompt}
        body: dict[str, Any] = {
            "model": self.names()[0],
            **prompt,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,
            "temperature": job.defaults.temperature if s.temperature is None else s.temperature,
            "top_p": job.defaults.top_p if s.top_p is None else s.top_p,
        }
        optional = {
            "n": job.n if job.n != 1 else None,
            "top_k": s.top_k,
            "repetition_penalty": s.repetition_penalty,
            "presence_penalty": s.presence_penalty or None,
            "frequency_penalty": s.frequency_penalty or None,
            "stop": list(s.stop) or None,
            "seed": s.seed,
            "min_tokens": s.min_tokens or None,
            "ignore_eos": s.ignore_eos or None,
            "logit_bias": {str(token): bias for token, bias in s.logit_bias} or None,
            # the legacy API's logprobs is the number of alternatives
            "logprobs": None if s.logprobs is None else (True if job.prompt is None else s.logprobs),
            "top_logprobs": s.logprobs if job.prompt is None else None,
        }
        fields = {**_constraint(s.constraint), **_tools(job)}
        return {**body, **fields, **{k: v for k, v in optional.items() if v is not None}}

    async def open(self, job: ChatJob) -> list[Stream]:
        if self._session is None or self._session.closed:
            raise BackendError(503, "the server is shutting down")
        body = self._body(job)
        if self._problem is not None:
            raise BackendError(502, f"the upstream {self.url} cannot be used: {self._problem}")
        path = "/chat/completions" if job.prompt is None else "/completions"
        try:
            response = await self._session.post(f"{self.url}{path}", json=body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            text = exception_text(exc, self._secrets)
            raise BackendError(502, f"the upstream {self.url} cannot be reached: {text}") from exc
        if response.status != 200:
            raise await self._refusal(response)
        # a legacy completion's alternatives include the sampled token besides the k asked for: the likeliest k stay
        alternatives = (job.sampling.logprobs or 0) if job.prompt is not None else None
        call = _Call(response, self.url, self._secrets, alternatives)
        loop = asyncio.get_running_loop()
        call.handles = [UpstreamHandle(next(self._ids), loop, call) for _ in range(job.n)]
        call.task = asyncio.create_task(call.pump())
        self._calls.add(call)
        call.task.add_done_callback(lambda _: self._forget(call))
        return list(call.handles)

    async def tokenize(self, job: ChatJob) -> Tokens:
        """The upstream's own count, from its /tokenize (vLLM's, and this server's): the prompt, or the messages with
        the tools, as it would prompt its model with them."""
        if job.prompt is not None:
            body: dict[str, Any] = {"prompt": job.prompt}
        else:
            body = {"messages": _messages(job.messages), **_tools(job)}
            body.pop("parallel_tool_calls", None)
        answer = await self._ask("/tokenize", {"model": self.names()[0], **body}, _token_ids)
        ids, length = answer
        if not ids and (job.prompt or job.messages):
            # llama.cpp's /tokenize reads another field and counts an empty text: a count of 0 would be a lie
            raise BackendError(502, f"the upstream {self.url} counted no tokens: its /tokenize takes another shape")
        return Tokens(ids, length)

    async def detokenize(self, ids: tuple[int, ...]) -> str:
        return await self._ask("/detokenize", {"model": self.names()[0], "tokens": list(ids)}, _detokenized)

    async def _ask(self, path: str, body: dict[str, Any], read: Callable[[Any], T]) -> T:
        """POST to one of the upstream's routes beside its OpenAI ones (at the root, not under /v1) and `read` its
        JSON answer (raising ValueError for one it cannot use); its refusals as `open`'s are. The answer is read and
        checked on a thread: it may hold a whole context's ids."""
        if self._session is None or self._session.closed:
            raise BackendError(503, "the server is shutting down")
        if self._problem is not None:
            raise BackendError(502, f"the upstream {self.url} cannot be used: {self._problem}")
        root = self.url.removesuffix("/v1")
        try:
            async with self._session.post(f"{root}{path}", json=body) as response:
                if response.status != 200:
                    raise await self._refusal(response)
                raw = await read_head(response.content, ANSWER_BYTES)
        except (aiohttp.ClientError, TimeoutError) as exc:
            text = exception_text(exc, self._secrets)
            raise BackendError(502, f"the upstream {self.url} cannot be reached: {text}") from exc
        try:
            return await asyncio.get_running_loop().run_in_executor(None, lambda: read(json.loads(raw)))
        except (ValueError, RecursionError) as exc:  # not JSON, or not what the route answers
            why = str(exc) if isinstance(exc, Unusable) else "no JSON"
            raise BackendError(502, f"the upstream {self.url} answered {path} with {why}") from exc

    def _forget(self, call: _Call) -> None:
        self._calls.discard(call)
        call.close()

    async def _refusal(self, response: aiohttp.ClientResponse) -> BackendError:
        """The upstream's refusal in our terms: the 4xx about the client's request (400, 413, 422) as they are, 429
        with Retry-After; 401 and 403 as 502 (they are about this server's key: passed on, they would tell the
        client its own key is wrong), any other 4xx as 502 (a 404 is a wrong --upstream or --upstream-model, not a
        wrong door), any 5xx as 502 (503 as 503: it is loading or overloaded)."""
        async with response:
            message, param = await refusal_message(response, self._secrets)
        status = response.status
        if status in (401, 403):
            log.warning("the upstream %s refused this server's credentials (%d): %s", self.url, status, message)
            return BackendError(502, REFUSED_CREDENTIALS)
        if status == 429:
            retry = clean(response.headers.get("Retry-After", "1"), 40, self._secrets) or "1"
            return BackendError(429, f"the upstream is busy: {message}", {"Retry-After": retry})
        if status in CLIENTS_FAULT:  # about the client's request: the field it blames too
            return BackendError(status, f"the upstream refused the request: {message}", param=param)
        if 400 <= status < 500:
            log.warning(REJECTED, self.url, status, message)
            return BackendError(502, f"the upstream as configured rejected the request ({status}): {message}")
        log.warning("the upstream %s failed a request (%d): %s", self.url, status, message)
        return BackendError(503 if status == 503 else 502, f"the upstream failed ({status}): {message}")
