"""The upstream backend: answers streamed from an OpenAI-compatible inference engine (vLLM, TGI, llama.cpp's
server, another instance of this one) instead of a local model. Auth, limits, metrics, both APIs and the web UI stay
here; batching and parallelism are the upstream's."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from itertools import count
from typing import Any

import aiohttp

from backends.base import BackendError, ChatJob, Stream
from backends.limits import check_limits
from generation.events import Delta, Failed, Finished, RequestHandle

log = logging.getLogger(__name__)

PROBE_EVERY = 2.0  # seconds between checks that the upstream answers


@dataclass(frozen=True)
class UpstreamConfig:
    """Where the upstream is and how to talk to it."""

    url: str  # its OpenAI base URL, ending in /v1
    api_key: str | None = None
    model: str | None = None  # the name to ask it for; default: the first it lists
    connect_timeout: float = 10.0
    read_timeout: float = 600.0  # the longest silence mid-answer before the stream counts as broken


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

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.handles: list[UpstreamHandle] = []
        self.task: asyncio.Task[None] | None = None

    def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def pump(self) -> None:
        """Read the upstream's chunks into each choice's queue; end every choice exactly once."""
        reasons: dict[int, str] = {}
        usage: dict[str, int] | None = None
        try:
            async with self.response:
                async for raw in self.response.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ValueError(chunk["error"].get("message", "the upstream reported an error"))
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        i = int(choice.get("index", 0))
                        text = (choice.get("delta") or {}).get("content")
                        if text and 0 <= i < len(self.handles):
                            self.handles[i].deliver(Delta(text))
                        if choice.get("finish_reason"):
                            reasons[i] = str(choice["finish_reason"])
        except asyncio.CancelledError:
            for h in self.handles:
                h.deliver(Failed("the client closed the request", "cancelled"))
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            for h in self.handles:
                h.deliver(Failed(f"the upstream stream broke: {exc}"))
            return
        for i, h in enumerate(self.handles):
            if i not in reasons:
                h.deliver(Failed("the upstream ended the stream before the answer"))
            elif usage is None:
                h.deliver(Finished(reasons[i], 0, 0, usage_known=False))
            else:  # the upstream counts all choices together: the first carries them
                tokens = usage.get("completion_tokens", 0) if i == 0 else 0
                h.deliver(Finished(reasons[i], usage.get("prompt_tokens", 0), tokens))


class UpstreamBackend:
    """Streams every job from an OpenAI-compatible upstream through one pooled aiohttp session."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.url = config.url.rstrip("/")
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
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.config.connect_timeout, sock_read=self.config.read_timeout
        )
        self._session = aiohttp.ClientSession(timeout=timeout, headers=self._headers())
        await self._probe()
        if self._reachable is not None:
            log.warning("the upstream %s does not answer yet (%s); serving anyway", self.url, self._reachable)
        self._prober = asyncio.create_task(self._probe_forever())

    async def _probe(self) -> None:
        """Ask the upstream for its models: whether it answers, and the names it serves."""
        assert self._session is not None
        try:
            async with self._session.get(f"{self.url}/models", timeout=aiohttp.ClientTimeout(total=3)) as resp:
                if resp.status != 200:
                    self._reachable = f"GET /models answered {resp.status}"
                    return
                body = await resp.json()
            self._models = tuple(str(m["id"]) for m in body.get("data", []) if "id" in m)
            self._reachable = None
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            self._reachable = f"{type(exc).__name__}: {exc}".rstrip(": ")

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(PROBE_EVERY)
            await self._probe()

    async def stop(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self._calls and time.monotonic() < deadline:  # noqa: ASYNC110 - calls end on their own tasks
            await asyncio.sleep(0.05)
        for call in list(self._calls):
            for h in call.handles:
                h.deliver(Failed("the server is shutting down", "unavailable"))
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
        """The OpenAI request for a job: every sampling field the client set passes through."""
        s = job.sampling
        max_tokens = s.max_tokens or job.limits.default_max_tokens
        check_limits(job.limits, s.max_tokens, 0, job.prompt_param)
        body: dict[str, Any] = {
            "model": self.names()[0],
            "messages": [{"role": m.role, "content": m.content} for m in job.messages],
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
        }
        return {**body, **{k: v for k, v in optional.items() if v is not None}}

    async def open(self, job: ChatJob) -> list[Stream]:
        if self._session is None or self._session.closed:
            raise BackendError(503, "the server is shutting down")
        body = self._body(job)
        try:
            response = await self._session.post(f"{self.url}/chat/completions", json=body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendError(502, f"the upstream {self.url} cannot be reached: {exc}") from exc
        if response.status != 200:
            raise await self._refusal(response)
        call = _Call(response)
        loop = asyncio.get_running_loop()
        call.handles = [UpstreamHandle(next(self._ids), loop, call) for _ in range(job.n)]
        call.task = asyncio.create_task(call.pump())
        self._calls.add(call)
        call.task.add_done_callback(lambda _: self._calls.discard(call))
        return list(call.handles)

    async def _refusal(self, response: aiohttp.ClientResponse) -> BackendError:
        """The upstream's refusal in our terms: its 4xx as they are, 429 with Retry-After, any 5xx as 502 (503 as
        503: it is loading or overloaded)."""
        async with response:
            try:
                message = str((await response.json(content_type=None))["error"]["message"])
            except (ValueError, KeyError, TypeError, aiohttp.ClientError):
                message = (await response.text())[:500] or response.reason or "no reason given"
        status = response.status
        if status == 429:
            return BackendError(
                429, f"the upstream is busy: {message}", {"Retry-After": response.headers.get("Retry-After", "1")}
            )
        if 400 <= status < 500:
            return BackendError(status, f"the upstream refused the request: {message}")
        return BackendError(503 if status == 503 else 502, f"the upstream failed ({status}): {message}")
