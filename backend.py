"""What the HTTP layer asks of whatever generates the answers: a local model (`local.py`) or an inference engine
upstream (`upstream.py`), chosen at start-up. The routes only see this interface."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from events import Event
from schema import Sampling
from text import Message, SamplingDefaults


@dataclass(frozen=True)
class ChatJob:
    """One chat request, in either API's words."""

    messages: tuple[Message, ...]
    sampling: Sampling  # as sent; unset fields take `defaults` (or the model family's own)
    defaults: SamplingDefaults  # the route's
    n: int = 1  # choices
    max_length: int | None = None  # ChatGLM's length: prompt + answer tokens
    trim: bool = False  # drop the oldest rounds when the prompt does not fit (the ChatGLM API) rather than refuse
    prompt_param: str = "messages"  # the request field a prompt over the context is blamed on


class Stream(Protocol):
    """One choice being generated: its events until Finished or Failed, and a way to stop it."""

    def events(self, keepalive: float = 15.0, gone: Callable[[], bool] | None = None) -> AsyncIterator[Event]: ...

    def cancel(self) -> None: ...


class BackendError(Exception):
    """The request cannot be served, with the status and headers the client should get (say, an upstream's 429)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class Backend(Protocol):
    """Generates answers for the routes; owns its lifecycle (model loading, connections)."""

    started_at: float

    @property
    def running(self) -> bool:
        """Able to take requests now."""

    @property
    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""

    async def start(self) -> None: ...

    async def stop(self, grace: float) -> None:
        """Stop; what is still running ends with Failed within `grace` seconds."""

    async def ready(self) -> BaseException | None:
        """Wait until the backend can serve, or failed to start (the error)."""

    def names(self) -> tuple[str, ...]:
        """The model names clients may use, when none were configured."""

    def describe(self) -> tuple[str, dict[str, Any]]:
        """/health's status ("ok", "loading", "unavailable") and what it reports besides."""

    async def clear(self) -> dict[str, Any]:
        """/clear: release cached accelerator memory; extra fields for the answer."""

    async def open(self, request: web.Request, job: ChatJob) -> list[Stream]:
        """Start a job's choices. Raises InvalidField, ChatRejected, QueueFull, EngineStopped or BackendError."""
