"""Generation engine: one worker thread runs the model; each request streams through its own asyncio.Queue."""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from itertools import count

import torch

from batch import KVBatch, batchable, decode_step, prefill, prefill_groups, select_rows
from loader import LoadedModel
from text import IncrementalDecoder, StopMatcher, TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling limits of the worker."""

    max_batch_size: int = 8  # requests decoded together in one forward pass; the rest wait
    max_queue: int = 64  # waiting requests before 429
    queue_timeout: float | None = None  # seconds a request may wait for a slot before it fails (503)


# ---- what the worker sends to a request's queue -------------------------------------------


@dataclass(frozen=True)
class Delta:
    """New text, never ending inside a character."""

    text: str


@dataclass(frozen=True)
class Finished:
    """Generation ended normally; reason is stop or length."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_s: float = 0.0  # time spent waiting for a batch slot


@dataclass(frozen=True)
class Failed:
    """Generation broke; the message is safe to show the client."""

    message: str
    type: str = "server_error"


@dataclass(frozen=True)
class KeepAlive:
    """Nothing arrived for a while: the request is waiting in the queue or prefilling."""


Event = Delta | Finished | Failed | KeepAlive


class QueueFull(Exception):
    """Too many requests are waiting already."""


class EngineStopped(Exception):
    """The engine is not running."""


# ---- per-request state ------------------------------------------------------------------------


class RequestHandle:
    """The event-loop side of one generation: its queue, and a way to cancel it."""

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop) -> None:
        self.id = request_id
        self.loop = loop
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


@dataclass
class _Sequence:
    """Worker-side state of one request."""

    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    decoder: IncrementalDecoder
    answer: TextStream  # the model family's response post-processing
    stops: StopMatcher
    tokens: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)
    queue_s: float = 0.0
    seen: torch.Tensor | None = None  # [V] bool: tokens of prompt + output, for repetition_penalty
    counts: torch.Tensor | None = None  # [V] float: output token counts, for presence/frequency


def _deliver(items: list[tuple[RequestHandle, Delta | Finished | Failed]]) -> None:
    """Runs on the event loop: fan a step's events out to the requests' queues."""
    for handle, event in items:
        handle.deliver(event)


# ---- sampling (pure, gpt-fast style) ---------------------------------------------------------


def sample(logits: torch.Tensor, seq: _Sequence, eos: frozenset[int]) -> int:
    """Pick the next token from logits [V] under the sequence's parameters."""
    p = seq.params
    if p.repetition_penalty != 1.0 and seq.seen is not None:
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seq.seen, penalised, logits)
    if (p.presence_penalty or p.frequency_penalty) and seq.counts is not None:
        logits = logits - p.frequency_penalty * seq.counts - p.presence_penalty * (seq.counts > 0).float()
    if eos and (p.ignore_eos or len(seq.tokens) < p.min_tokens):
        logits = logits.clone()
        logits[list(eos)] = float("-inf")
    if p.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= p.top_p
        drop[0] = False  # top_p 0 keeps just the most likely token
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=seq.generator))


# ---- the engine --------------------------------------------------------------------------------


class Engine:
    """Owns the worker thread. `submit` on the event loop; the worker does all model work."""

    def __init__(self, model: LoadedModel | Callable[[], LoadedModel], config: EngineConfig | None = None) -> None:
        # a callable is run on the worker thread, so the server answers (503) while the model loads
        self._model = model if isinstance(model, LoadedModel) else None
        self._load = None if isinstance(model, LoadedModel) else model
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        if self._model is not None:
            self.ready.set()
        self.config = config or EngineConfig()
        self._inbox: queue.Queue[_Sequence | None] = queue.Queue()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # row i of self._batch is self._running[i]
        self._batch = KVBatch()
        self._batchable = True  # until a prefill shows a cache that cannot be batched
        self._outbox: list[tuple[RequestHandle, Delta | Finished | Failed]] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ids = count(1)
        self._pending = 0  # submitted but not yet running (event-loop view, guarded by _lock)
        self._live: dict[int, _Sequence] = {}  # admitted and not yet ended, by request id (guarded by _lock)
        self._lock = threading.Lock()
        self.started_at = time.time()

    @property
    def model(self) -> LoadedModel:
        """The loaded model; EngineStopped while it is still loading."""
        if self._model is None:
            raise EngineStopped("the model is still loading" if self.load_error is None else "the model failed to load")
        return self._model

    # -- event-loop side

    def start(self) -> None:
        """Start the worker thread."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._work, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still running end with Failed."""
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            # a model load cannot be interrupted: waiting for it would only delay the exit
            self._thread.join(timeout if self.ready.is_set() else 0)
            self._thread = None

    @property
    def running(self) -> bool:
        """True while the worker runs with a loaded model."""
        return self.ready.is_set() and self._thread is not None and self._thread.is_alive()

    @property
    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._lock:
            return len(self._live), self._pending

    def submit(self, prompt: list[int], params: SamplingParams) -> RequestHandle:
        """Queue a generation; call on the event loop. Raises QueueFull or EngineStopped."""
        if not self.running or self._stopping.is_set():
            raise EngineStopped("the engine is not running")
        with self._lock:
            if self._pending >= self.config.max_queue:
                raise QueueFull(f"{self._pending} requests are already waiting")
            self._pending += 1
        handle = RequestHandle(next(self._ids), asyncio.get_running_loop())
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        lm = self.model
        decoder = IncrementalDecoder(lm.tokenizer, prompt)
        seq = _Sequence(handle, prompt, params, generator, decoder, lm.chat.response_stream(), StopMatcher(params.stop))
        self._inbox.put(seq)
        return handle

    # -- worker side

    def _work(self) -> None:
        log.info("engine worker started")
        try:
            if self._model is None and self._load is not None:
                try:
                    self._model = self._load()
                except BaseException as exc:
                    if self._stopping.is_set():  # told to stop mid-load (SIGTERM): not a load error
                        log.info("stopped while the model was loading")
                        return
                    self.load_error = exc  # whoever started the engine reports it (see `load_error`)
                    return
                finally:
                    self.ready.set()
            with torch.inference_mode():
                while not self._stopping.is_set():
                    try:
                        self._step()
                    except Exception:
                        # a bug or a fault we did not foresee: end what was generating, keep serving the rest
                        log.exception("engine step failed; ending the requests it was generating")
                        self._abandon_live("generation failed: internal error")
        except Exception:
            log.exception("engine worker crashed")
        finally:
            self._stopping.set()
            self._take_new(block=False)
            with self._lock:
                ending = [*self._live.values(), *self._waiting]
            for seq in ending:
                self._emit(seq.handle, Failed("the server is shutting down", "unavailable"))
            self._flush()
            log.info("engine worker stopped")

    def _step(self) -> None:
        self._take_new(block=not self._running and not self._waiting)
        self._drop_cancelled()
        self._expire_waiting()
        self._admit()
        if self._running:
            self._decode()
            self._flush()

    def _abandon_live(self, message: str) -> None:
        """End every admitted request with Failed(message) and start over with an empty batch."""
        with self._lock:
            live = list(self._live.values())
        for seq in live:
            self._retire(seq, Failed(message))
        self._running = []
        self._batch = KVBatch()
        self._flush()

    def _emit(self, handle: RequestHandle, event: Delta | Finished | Failed) -> None:
        self._outbox.append((handle, event))

    def _flush(self) -> None:
        """Send the step's events across threads in one call per event loop, not one per token.

        Fewer wake-ups of the loop thread means less contention for the GIL with the model's step.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Delta | Finished | Failed]]] = {}
        for handle, event in self._outbox:
            by_loop.setdefault(handle.loop, []).append((handle, event))
        self._outbox.clear()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for handle, _ in items:
                    handle.cancel()

    def _take_new(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        if any(seq.handle.cancelled for seq in self._waiting):  # a request that left frees its place in the queue
            waiting = deque(seq for seq in self._waiting if not seq.handle.cancelled)
            with self._lock:
                self._pending -= len(self._waiting) - len(waiting)
            self._waiting = waiting
        keep = [i for i, seq in enumerate(self._running) if not seq.handle.cancelled]
        for seq in self._running:
            if seq.handle.cancelled:
                self._retire(seq, Failed("cancelled", "cancelled"))
        self._keep(keep)

    def _expire_waiting(self) -> None:
        timeout = self.config.queue_timeout
        if timeout is None:
            return
        now = time.monotonic()
        while self._waiting and now - self._waiting[0].submitted > timeout:
            seq = self._waiting.popleft()
            with self._lock:
                self._pending -= 1
            self._emit(seq.handle, Failed(f"waited over {timeout:g} s for a free slot", "unavailable"))
        self._flush()

    def _keep(self, rows: list[int]) -> None:
        self._batch.keep(rows)  # frees the KV cache of the rows that left
        self._running = [self._running[i] for i in rows]

    def _admit(self) -> None:
        """Prefill waiting requests into free slots, together where they can; each gets its first token at once."""
        new: list[_Sequence] = []
        while self._waiting and len(self._running) + len(new) < self.config.max_batch_size:
            if (self._running or new) and not self._batchable:
                break  # this model's cache cannot be batched: one request at a time
            seq = self._waiting.popleft()
            with self._lock:
                self._pending -= 1
                if seq.handle.cancelled:
                    continue
                self._live[seq.handle.id] = seq
            seq.queue_s = time.monotonic() - seq.submitted
            new.append(seq)
        for group in prefill_groups([seq.prompt for seq in new]):
            self._prefill([new[i] for i in group])

    def _prefill(self, seqs: list[_Sequence]) -> None:
        try:
            logits, cache, mask = prefill(self.model, [seq.prompt for seq in seqs])
        except Exception as exc:
            if len(seqs) > 1:  # find the broken request: alone, only it fails
                for seq in seqs:
                    self._prefill([seq])
                return
            log.exception("prefill failed for request %s", seqs[0].handle.id)
            self._retire(seqs[0], Failed(f"generation failed: {exc}"))
            self._flush()
            return
        self._batchable = batchable(cache)
        if not self._batchable and len(seqs) > 1:
            # this model's cache cannot be batched after all: the first goes alone, the rest wait their turn
            for seq in reversed(seqs[1:]):
                with self._lock:
                    del self._live[seq.handle.id]
                    self._pending += 1
                self._waiting.appendleft(seq)
            self._prefill(seqs[:1])
            return
        vocab = logits.shape[-1]
        for seq in seqs:
            seq.counts = torch.zeros(vocab, device=logits.device)
            seq.seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
            seq.seen[[t for t in seq.prompt if t < vocab]] = True
        keep = self._sample_rows(seqs, logits)
        if keep:
            self._batch.add(select_rows(cache, keep), mask[keep])
            self._running.extend(seqs[i] for i in keep)
        self._flush()  # first tokens go out now, not after the other prefills

    def _decode(self) -> None:
        """One forward pass over every running request, then each samples its own token."""
        try:
            logits = decode_step(self.model, self._batch, [seq.tokens[-1] for seq in self._running])
        except Exception as exc:  # one forward pass for all: the failure cannot be pinned on one request
            log.exception("decode step failed")
            self._abandon_live(f"generation failed: {exc}")
            return
        self._keep(self._sample_rows(self._running, logits))

    def _sample_rows(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """Each sequence samples from its row of logits [B, V]; returns the rows still running."""
        keep = []
        for i, seq in enumerate(seqs):
            try:  # a fault in one request's sampling or detokenizing ends only that request
                if self._advance(seq, sample(logits[i], seq, self.model.eos_token_ids)):
                    keep.append(i)
            except Exception as exc:
                log.exception("sampling failed for request %s", seq.handle.id)
                self._retire(seq, Failed(f"generation failed: {exc}"))
        return keep

    def _retire(self, seq: _Sequence, event: Finished | Failed) -> None:
        """End a sequence with its final event, once."""
        with self._lock:
            if self._live.pop(seq.handle.id, None) is None:
                return
        self._emit(seq.handle, event)

    def _advance(self, seq: _Sequence, token: int) -> bool:
        """Record a sampled token and stream its text; False once the sequence has finished."""
        lm = self.model
        seq.tokens.append(token)
        assert seq.counts is not None and seq.seen is not None
        seq.counts[token] += 1
        seq.seen[token] = True
        is_eos = token in lm.eos_token_ids
        text = "" if is_eos else seq.decoder.push(token)
        reason: str | None = "stop" if is_eos else None
        if reason is None and (
            len(seq.tokens) >= seq.params.max_new_tokens or len(seq.prompt) + len(seq.tokens) >= lm.context_length
        ):
            reason = "length"
        if reason is not None:
            text += seq.decoder.flush()
        text = seq.answer.push(text) + (seq.answer.flush() if reason is not None else "")
        out, hit = seq.stops.push(text)
        if hit:
            reason = "stop"
        elif reason is not None:
            out += seq.stops.flush()
        if out:
            self._emit(seq.handle, Delta(out))
        if reason is None:
            return True
        self._retire(seq, Finished(reason, len(seq.prompt), len(seq.tokens), seq.queue_s))
        return False
