"""What the doors ask of whatever generates the answers: a local model (`backends/local.py`) or an inference engine
upstream (`backends/upstream.py`), chosen at start-up. The doors see only this module: the job they hand down, the
events they get back, and the errors a backend raises. Nothing of aiohttp's server crosses into a backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from generation.events import Delta, Event, Failed, Finished, KeepAlive, TokenLogprob, TopLogprob
from generation.structured import Constraint
from models.chat_format import Message, SamplingDefaults
from models.tools.base import CallDelta, Tool, ToolCall

__all__ = [
    "Backend",
    "BackendError",
    "CallDelta",
    "ChatJob",
    "Constraint",
    "Delta",
    "Event",
    "Failed",
    "Finished",
    "InvalidField",
    "KeepAlive",
    "Limits",
    "Message",
    "Sampling",
    "SamplingDefaults",
    "Stream",
    "TokenLogprob",
    "Tokens",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "TopLogprob",
]


class InvalidField(Exception):
    """A request that breaks the protocol or a limit; `param` names the offending field (a 400)."""

    def __init__(self, param: str | None, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code


class BackendError(Exception):
    """The request cannot be served, with the status and headers the client should get (the queue is full: 429;
    the model is loading or the engine stopped: 503; an upstream's own refusal)."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers
        self.param = param  # the request field it is about (an upstream's 400 may name one)


@dataclass(frozen=True)
class Sampling:
    """Sampling fields as sent; None means the route's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = None
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias -100..100), as OpenAI's logit_bias
    logprobs: int | None = None  # None: none; k: each token's logprob and its k likeliest alternatives (0-20)
    constraint: Constraint | None = None  # the answer held to a schema, regex, choice list or grammar


@dataclass(frozen=True)
class Limits:
    """The server's ceilings on a job, from the command line."""

    default_max_tokens: int = 1024  # an answer's length when a request names none
    max_tokens_limit: int = 8192  # ceiling for a request's max_tokens
    max_prompt_tokens: int | None = None  # None: the model's context length
    # the ChatGLM API keeps at most this many prompt tokens of a conversation's history (None: what the context
    # holds): prefilling a whole context takes tens of seconds on a small CPU
    history_tokens: int | None = 2048


@dataclass(frozen=True)
class ToolChoice:
    """Which calls an answer may or must make: `mode` none (the tools stay out of the prompt), auto (the model
    decides), required (at least one call) or function (a call of `name`); `parallel`: more than one call."""

    mode: str = "auto"
    name: str | None = None
    parallel: bool = True


@dataclass(frozen=True)
class ChatJob:
    """One generation request, in any door's words: a conversation, or a raw prompt (`prompt`: its text as it is,
    no chat template, and the answer the model's text as it is; `messages` is empty then)."""

    messages: tuple[Message, ...]
    sampling: Sampling  # as sent; unset fields take `defaults` (or the model family's own)
    defaults: SamplingDefaults  # the route's
    n: int = 1  # choices
    max_length: int | None = None  # ChatGLM's length: prompt + answer tokens
    trim: bool = False  # drop the oldest rounds when the prompt does not fit (the ChatGLM API) rather than refuse
    prompt_param: str = "messages"  # the request field a prompt over the context is blamed on
    template_param: str | None = "messages"  # the field a chat template's refusal is blamed on
    limits: Limits = Limits()
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    prompt: str | None = None


@dataclass(frozen=True)
class Tokens:
    """A prompt's token ids as the model reads them, and the model's context length (None: an upstream that did not
    say)."""

    ids: tuple[int, ...]
    context_length: int | None


class Stream(Protocol):
    """One choice being generated: its events until Finished or Failed, and a way to stop it; `prompt_tokens`: the
    prompt's length when known from the start (a local model's; an upstream says it only at the end, in Finished)."""

    prompt_tokens: int | None

    def events(self, keepalive: float = 15.0, gone: Callable[[], bool] | None = None) -> AsyncIterator[Event]: ...

    def cancel(self) -> None: ...


class Backend(Protocol):
    """Generates answers for the doors; owns its lifecycle (model loading, connections, prompt threads)."""

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
        """/health's status ("ok", "loading", "failed", "unavailable") and what it reports besides."""

    async def clear(self) -> dict[str, Any]:
        """/clear: empty the prefix cache, release cached accelerator memory; extra fields for the answer."""

    async def open(self, job: ChatJob) -> list[Stream]:
        """Start a job's choices. Raises InvalidField or BackendError."""

    async def tokenize(self, job: ChatJob) -> Tokens:
        """The prompt ids `open` would generate the job's answer from (its raw prompt; or its messages, with its
        tools, through the chat template), without generating. Raises InvalidField or BackendError."""

    async def detokenize(self, ids: tuple[int, ...]) -> str:
        """The text of token ids. Raises InvalidField (an id the model does not have) or BackendError."""
