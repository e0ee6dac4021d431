"""What a generation sends its consumer, and the consumer's handle on it (the event-loop side of the engine)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from models.tools.base import CallDelta


@dataclass(frozen=True)
class TopLogprob:
    """One of the likeliest tokens at a step: its text, log-probability and raw bytes."""

    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability (OpenAI's: after penalties and constraints, before temperature), its raw
    bytes (a token may hold part of a character: the bytes of all tokens join to the answer's UTF-8) and the
    likeliest tokens at that step, most likely first."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Delta:
    """New text, never ending inside a character; with `logprobs` asked for, the tokens that made it; `calls`:
    pieces of tool calls, after the text."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    calls: tuple[CallDelta, ...] = ()


@dataclass(frozen=True)
class Finished:
    """Generation ended normally; reason is stop, length or tool_calls (the answer made calls)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_s: float = 0.0  # time spent waiting for a batch slot
    usage_known: bool = True  # False: an upstream that reports no usage (the counts are 0, not invented)
    stop_sequence: str | None = None  # the request's stop string that ended the answer (reason "stop")
    cached_tokens: int | None = 0  # prompt tokens taken from a prefix cache, not prefilled; None: an upstream's unsaid


@dataclass(frozen=True)
class Failed:
    """Generation broke; the message is safe to show the client."""

    message: str
    type: str = "server_error"


@dataclass(frozen=True)
class KeepAlive:
    """Nothing arrived for a while: the request is waiting in the queue or prefilling."""


Event = Delta | Finished | Failed | KeepAlive


class RequestHandle:
    """The event-loop side of one generation: its queue, and a way to cancel it."""

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop, prompt_tokens: int | None = None) -> None:
        self.id = request_id
        self.loop = loop
        self.prompt_tokens = prompt_tokens  # the prompt's length where it is known before the answer (a local model)
        self._queue: asyncio.Queue[Delta | Finished | Failed] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.done = False

    def cancel(self) -> None:
        """Ask the worker to stop this generation at its next step (safe from any thread)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def deliver(self, event: Delta | Finished | Failed) -> None:
        """Hand an event to the consumer; runs on the event loop."""
        self._queue.put_nowait(event)

    async def events(self, keepalive: float = 15.0, gone: Callable[[], bool] | None = None) -> AsyncIterator[Event]:
        """Yield events until Finished or Failed; KeepAlive after `keepalive` idle seconds.

        `gone` is asked at every event and at least every second, so a consumer that left is noticed while the
        request waits, prefills or holds text back too: the generation is cancelled and the last event is
        Failed of type "cancelled".
        """
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        while True:
            if gone is not None and gone():
                self.cancel()
                self.done = True
                yield Failed("the client closed the request", "cancelled")
                return
            wait = keepalive - (loop.time() - idle_since)
            if wait <= 0:
                idle_since = loop.time()
                yield KeepAlive()
                continue
            try:
                event = await asyncio.wait_for(self._queue.get(), min(wait, 1.0))
            except TimeoutError:
                continue
            idle_since = loop.time()
            if isinstance(event, (Finished, Failed)):
                self.done = True
            yield event
            if self.done:
                return


def _deliver(items: list[tuple[RequestHandle, Delta | Finished | Failed]]) -> None:
    """Runs on the event loop: fan a step's events out to the requests' queues."""
    for handle, event in items:
        handle.deliver(event)


class Outbox:
    """The worker's events of one step, sent across threads in one call per event loop, not one per token: fewer
    wake-ups of the loop thread means less contention for the GIL with the model's step."""

    def __init__(self) -> None:
        self._items: list[tuple[RequestHandle, Delta | Finished | Failed]] = []

    def append(self, item: tuple[RequestHandle, Delta | Finished | Failed]) -> None:
        self._items.append(item)

    def flush(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Delta | Finished | Failed]]] = {}
        for handle, event in self._items:
            by_loop.setdefault(handle.loop, []).append((handle, event))
        self._items.clear()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for handle, _ in items:
                    handle.cancel()
