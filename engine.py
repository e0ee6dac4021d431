"""Generation engine: one worker thread runs the model; each request streams through its own asyncio.Queue.

Every step of the worker: take new requests, drop the ones whose client left, prefill what the step's token budget
allows (a long prompt a chunk at a time, short ones together), then one decode step over every running request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import torch

from generation.batch import KVBatch, batchable, decode_step, prefill, prefill_chunk, prefill_groups, select_rows
from generation.constraints import Matcher, apply_masks
from generation.events import Delta, Failed, Finished, Outbox, RequestHandle, TokenLogprob
from generation.logprobs import TokenTexts
from generation.loop_guard import LATE, LoopGuard, repeat_penalties
from generation.output import Output
from generation.prefix_cache import PrefixCache, prefix_cache_for, restored, row_kv, tokens_in
from generation.sampling import History, Sampled, SamplingParams, sample
from generation.scheduler import PrefillClock, Scheduler
from generation.threads import ThreadTuner
from models.chat_format import PassThrough
from models.loader import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling limits of the worker."""

    max_batch_size: int | None = 8  # requests decoded together in one forward pass; None: what memory affords
    max_queue: int = 64  # waiting requests before 429
    queue_timeout: float | None = None  # seconds a request may wait for a slot before it fails (503)
    # prompt tokens prefilled per step at most: a long prompt is prefilled in chunks between decode steps, so the
    # running streams pause for one chunk at most (0: whole prompts at once); models that cannot be chunked ignore
    # it. Deep into a long prompt a chunk shrinks, so that it costs about what a full one at the prompt's start costs
    prefill_chunk: int = 512
    # seconds of prefill work per step: fewer tokens than `prefill_chunk` where this device prefills them slower (a
    # CPU without AVX-512 takes about 2 ms a token for the bundled model, so 512 would pause the streams for a second)
    prefill_seconds: float = 0.7
    threads: int | None = None  # torch's compute threads; None: measured while serving (generation/threads.py)
    # bytes of earlier requests' keys and values kept for prompts that start the same way, in MB; None: a quarter of
    # the memory left after the weights and the batch's cache at full context; 0: no prefix cache
    prefix_cache_mb: float | None = None
    # JSON answers: lower the tokens that would repeat a span of the answer once more, so that a small model ends its
    # JSON instead of looping until max_tokens (generation/loop_guard.py); the default acts only once an answer has
    # used half its budget, so lists that repeat on purpose and end before are left alone; None: off
    loop_guard: LoopGuard | None = LATE


class QueueFull(Exception):
    """Too many requests are waiting already."""


class EngineStopped(Exception):
    """The engine is not running."""


@dataclass(frozen=True)
class _ClearPrefixCache:
    """A request to the worker to forget the prefix cache; `done` gets the bytes freed."""

    done: concurrent.futures.Future[int]


@dataclass
class _Sequence:
    """Worker-side state of one request."""

    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    output: Output  # token ids to client text
    tokens: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)
    queue_s: float = 0.0
    history: History | None = None  # set once prefilled
    cache: Any = None  # the KV cache of a prompt prefilled in chunks (or after a prefix cache hit), while it is
    prefilled: int = 0  # prompt tokens in that cache
    cached: int = 0  # prompt tokens the prefix cache held when the queue last reached it
    hit: int | None = None  # prompt tokens taken from the prefix cache, not prefilled; None: no prefix cache looked
    matcher: Matcher | None = None  # its place in its constraint's grammar, when it has one
    pending: list[TokenLogprob] = field(default_factory=list)  # logprobs of tokens whose text is not out yet


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
        self._inbox: queue.Queue[_Sequence | _ClearPrefixCache | None] = queue.Queue()
        self._sched: Scheduler[_Sequence] = Scheduler()  # waiting, running (row i of self._batch) and chunking
        self._batch = KVBatch()
        self._batchable = True  # until a prefill shows a cache that cannot be batched
        self._outbox = Outbox()  # the step's events, sent to the event loops together
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ids = count(1)
        self.tuner: ThreadTuner | None = None  # made on the worker, before the model loads
        self._clock: PrefillClock | None = None  # a prompt token's measured cost; made once the model is loaded
        self._prefills = 0  # prefill calls so far (a decode step after one in the same engine step is not clean)
        self._texts: TokenTexts | None = None  # tokens' bytes for logprobs, made when first asked for
        self.prefix: PrefixCache | None = None  # made once the model is loaded, where its cache can be extended
        # guarded by _lock, shared with the event loop: requests not yet ended, and those of them admitted
        self._lock = threading.Lock()
        self._open: dict[int, RequestHandle] = {}
        self._live: dict[int, _Sequence] = {}
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
        """Stop the worker; requests not finished end with Failed, within `timeout` even if a step is stuck."""
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            # a model load cannot be interrupted: waiting for it would only delay the exit
            self._thread.join(timeout if self.ready.is_set() else 0)
            if self._thread.is_alive():  # a long forward pass: its requests end now, the thread ends with it
                self._end_everything("the server is shutting down")
            self._thread = None

    @property
    def max_batch_size(self) -> int:
        """Requests decoded together: the configured number, else what the model's memory affords."""
        return self.config.max_batch_size or self.model.batch_size

    @property
    def running(self) -> bool:
        """True while the worker runs with a loaded model."""
        return self.ready.is_set() and self._thread is not None and self._thread.is_alive()

    @property
    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._lock:
            return len(self._live), len(self._open) - len(self._live)

    def submit(self, prompt: list[int], params: SamplingParams) -> RequestHandle:
        """Queue a generation; call on the event loop. Raises QueueFull or EngineStopped."""
        if not self.running or self._stopping.is_set():
            raise EngineStopped("the engine is not running")
        handle = RequestHandle(next(self._ids), asyncio.get_running_loop(), len(prompt))
        with self._lock:
            waiting = len(self._open) - len(self._live)
            if waiting >= self.config.max_queue:
                raise QueueFull(f"{waiting} requests are already waiting")
            self._open[handle.id] = handle
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        lm = self.model
        tools = params.tools
        calls = None if tools is None else tools.stream()
        parallel = tools is None or tools.parallel
        markers = dict(tools.markers) if tools is not None else None
        text = PassThrough() if params.raw_text else lm.chat.response_stream()
        output = Output(lm.tokenizer, prompt, text, params.stop, calls, parallel, markers)
        seq = _Sequence(handle, prompt, params, generator, output)
        if params.constraint is not None:
            seq.matcher = params.constraint.matcher()
        self._inbox.put(seq)
        return handle

    def _end_everything(self, message: str) -> None:
        """From outside the worker: end every open request at once (it may be stuck in a long forward pass)."""
        with self._lock:
            handles = list(self._open.values())
            self._open.clear()
            self._live.clear()
        for handle in handles:
            try:
                handle.loop.call_soon_threadsafe(handle.deliver, Failed(message, "unavailable"))
            except RuntimeError:  # its loop is closed: nobody is listening
                handle.cancel()

    # -- worker side

    def _work(self) -> None:
        log.info("engine worker started")
        try:
            # before the load: the kernels are measured at the thread count that serves
            threads = self.config.threads or torch.get_num_threads()
            self.tuner = ThreadTuner(threads, fixed=self.config.threads is not None)
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
            # the calibration's estimate until prefills are measured
            estimate = self.model.prefill_us_per_token / 1e6 or None
            self._clock = PrefillClock(self.model.attention_break_even, estimate)
            try:  # an optimization: a model it cannot size is served without one
                self.prefix = prefix_cache_for(self.model, self.config.prefix_cache_mb, self.max_batch_size)
            except Exception:
                log.exception("prefix cache: off (it could not be set up for this model)")
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
            self._answer_clears()
            with self._lock:
                handles = list(self._open.values())
            for handle in handles:
                self._end(handle, Failed("the server is shutting down", "unavailable"))
            self._flush()
            log.info("engine worker stopped")

    def _step(self) -> None:
        self._take_new(block=self._sched.idle)
        self._drop_cancelled()
        self._expire_waiting()
        prefills = self._prefills
        self._admit()
        if self._sched.running:
            self._decode(clean=self._prefills == prefills)
            self._flush()

    def _abandon_live(self, message: str) -> None:
        """End every admitted request with Failed(message) and start over with an empty batch."""
        with self._lock:
            live = list(self._live.values())
        for seq in live:
            self._end(seq.handle, Failed(message))
        self._sched.running, self._sched.chunking = [], None
        self._batch = KVBatch()
        self._flush()

    def _token_texts(self) -> TokenTexts:
        if self._texts is None:
            self._texts = TokenTexts(self.model.tokenizer, tuple(sorted(self.model.eos_token_ids)))
        return self._texts

    def _emit(self, handle: RequestHandle, event: Delta) -> None:
        self._outbox.append((handle, event))

    def _end(self, handle: RequestHandle, event: Finished | Failed) -> None:
        """A request's final event, sent once whichever part of the engine ends it first."""
        with self._lock:
            if self._open.pop(handle.id, None) is None:
                return
            self._live.pop(handle.id, None)
        self._outbox.append((handle, event))

    def _flush(self) -> None:
        self._outbox.flush()

    def _take_new(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
            while True:
                if isinstance(item, _ClearPrefixCache):
                    freed = self.prefix.clear() if self.prefix is not None else 0
                    if item.done.set_running_or_notify_cancel():  # False: the caller stopped waiting
                        item.done.set_result(freed)
                elif item is not None:
                    self._sched.waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        """Requests whose client left free their place in the queue, their prefill, their row of the batch."""
        cancelled = Failed("cancelled", "cancelled")
        sched = self._sched
        for seq in sched.drop_waiting(lambda seq: seq.handle.cancelled):
            self._end(seq.handle, cancelled)
        if sched.chunking is not None and sched.chunking.handle.cancelled:
            seq = sched.chunking
            self._end(seq.handle, cancelled)
            self._flush()
            if seq.cache is not None:  # its finished chunks stay for a prompt that starts the same way
                self._remember(seq.prompt[: seq.prefilled], seq.cache, 0, seq.prefilled)
            sched.chunking = None
        keep = [i for i, seq in enumerate(sched.running) if not seq.handle.cancelled]
        for seq in sched.running:
            if seq.handle.cancelled:
                self._end(seq.handle, cancelled)
        self._keep(keep)

    def _expire_waiting(self) -> None:
        timeout = self.config.queue_timeout
        if timeout is None:
            return
        for seq in self._sched.expired(timeout):
            self._end(seq.handle, Failed(f"waited over {timeout:g} s for a free slot", "unavailable"))
        self._flush()

    def _keep(self, rows: list[int]) -> None:
        self._remember_leavers(rows)
        self._batch.keep(rows)  # frees the KV cache of the rows that left
        self._sched.keep(rows)

    # -- prefix cache

    def clear_prefix_cache(self) -> concurrent.futures.Future[int]:
        """Forget the prefix cache (on the worker, between two steps); the future gets the bytes freed."""
        done: concurrent.futures.Future[int] = concurrent.futures.Future()
        if not self.running or self.prefix is None:
            done.set_result(0)
        else:
            self._inbox.put(_ClearPrefixCache(done))
        return done

    def _answer_clears(self) -> None:
        """The worker is stopping: clears still queued get their answer now (nothing was freed)."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _ClearPrefixCache) and item.done.set_running_or_notify_cancel():
                item.done.set_result(0)

    def _prefix_failed(self, what: str) -> None:
        """The prefix cache broke (a model whose cache it cannot read, memory): off for the rest of the run, as it is
        an optimization; the requests go on without it."""
        log.exception("prefix cache: off from now on: %s failed", what)
        self.prefix = None

    def _remember_leavers(self, rows: list[int]) -> None:
        """Keep the keys and values of the running requests not in `rows`, which leave the batch: what each fed the
        model, its prompt and then its answer but the last token."""
        if self.prefix is None or len(rows) == len(self._sched.running):
            return
        self._flush()  # the leavers' last events go out before their keys and values are copied
        kept = set(rows)
        for i, seq in enumerate(self._sched.running):
            if i not in kept:
                fed = self._batch.positions[i]
                self._remember((seq.prompt + seq.tokens)[:fed], self._batch.cache, i, fed)

    def _remember(self, tokens: list[int], cache: Any, row: int, fed: int) -> None:
        """Keep the keys and values of the `fed` tokens a row of `cache` holds (its last `fed` columns)."""
        if self.prefix is None:
            return
        try:
            first = cache.layers[0].keys.shape[2] - fed
            self.prefix.put(tokens, row_kv(cache, row, first))
        except Exception:  # never touches a request
            self._prefix_failed("keeping a request's keys and values")

    def _set_cached(self, seq: _Sequence) -> None:
        """Set how much of a waiting prompt the prefix cache holds (at least its last token is prefilled: it gives
        the logits of the first answer token)."""
        if self.prefix is not None:
            seq.cached = tokens_in(self.prefix.match(seq.prompt, len(seq.prompt) - 1))

    def _restore(self, seq: _Sequence) -> bool:
        """Start an admitted prompt's cache from the longest prefix the prefix cache holds, if any. False if that
        failed where the scheduler counted on a hit (the cache is off now; the prompt must be weighed again)."""
        if self.prefix is None:  # turned off since it was weighed: weighed again, in full
            counted_on, seq.cached = seq.cached, 0
            return not counted_on
        try:
            blocks = self.prefix.take(seq.prompt, len(seq.prompt) - 1)
            seq.hit = tokens_in(blocks)
            if blocks:
                seq.cache = restored(self.model.model, self.model.fp32_attention, blocks, len(seq.prompt))
                seq.prefilled = seq.hit
            self.prefix.counted(len(seq.prompt), seq.hit)
            return True
        except Exception:
            self._prefix_failed(f"restoring request {seq.handle.id}")
            seq.cache, seq.prefilled, seq.hit, seq.cached = None, 0, None, 0
            return False

    def _requeue(self, seq: _Sequence) -> None:
        """Put an admitted request back at the head of the queue (it was not prefilled)."""
        with self._lock:  # a stop may have ended it meanwhile (`_end_everything`)
            self._live.pop(seq.handle.id, None)
        self._sched.waiting.appendleft(seq)

    # -- prefill

    def _budget(self) -> int | None:
        """Prompt tokens this step may prefill; None: no limit (chunking is off or the model cannot be chunked)."""
        if not self.config.prefill_chunk or not self.model.chunked_prefill:
            return None
        return self._full_chunk()

    def _full_chunk(self) -> int:
        """A full chunk this step: `chunk_tokens` while streams decode (they wait for it), `prefill_chunk` when none
        does: then a bigger step only brings first tokens sooner (16 prompts arriving together on an AVX2 CPU)."""
        return self.chunk_tokens if self._sched.running else self.config.prefill_chunk

    @property
    def chunk_tokens(self) -> int:
        """A full chunk: `prefill_chunk` tokens, fewer where they would take more than `prefill_seconds` here."""
        if self._clock is None:
            return self.config.prefill_chunk
        return self._clock.chunk_tokens(self.config.prefill_chunk, self.config.prefill_seconds)

    def _measured(self, tokens: int, offset: int, seconds: float) -> None:
        self._prefills += 1
        assert self._clock is not None
        self._clock.measured(tokens, offset, seconds)

    def _admit(self) -> None:
        """Prefill what this step's budget allows: the next chunk of a long prompt, then waiting requests into
        free slots, short prompts together; each request's first token goes out as its prefill completes."""
        sched = self._sched
        budget = self._budget()
        if sched.chunking is not None and budget is not None:
            budget -= self._prefill_chunk(budget)
        look = self._set_cached if self.prefix is not None else None
        picked = sched.admit(
            budget, self.max_batch_size, self._batchable, self._admitted, look, self.model.attention_break_even
        )
        if picked.whole:
            log.debug("admitting %d; %d run, %d wait", len(picked.whole), len(sched.running), len(sched.waiting))
        # every hit is restored before any forward pass: what the scheduler weighed is what gets prefilled
        whole = []
        for seq in picked.whole:
            if self._restore(seq):
                whole.append(seq)
            else:
                self._requeue(seq)
        if picked.chunked is not None:
            self._restore(picked.chunked)  # a failure here costs nothing: the chunks are weighed as they go
            self._prefill_chunk(picked.room)
        for seq in whole:
            if seq.hit:  # the rest of its prompt after the cached part, alone: each hit is of its own length
                self._extend(seq, len(seq.prompt) - seq.prefilled)
        fresh = [seq for seq in whole if not seq.hit]
        for group in prefill_groups([seq.prompt for seq in fresh]):
            self._prefill([fresh[i] for i in group])

    def _admitted(self, seq: _Sequence) -> bool:
        """Count a request as running (False if it was ended meanwhile)."""
        with self._lock:
            if seq.handle.id not in self._open:
                return False
            self._live[seq.handle.id] = seq
        seq.queue_s = time.monotonic() - seq.submitted
        return True

    def _prefill_chunk(self, budget: int) -> int:
        """Prefill the next chunk of the chunked prompt, at most `budget` tokens; returns how many it took."""
        seq = self._sched.chunking
        assert seq is not None
        take = self._sched.next_chunk(budget, self._full_chunk(), self.model.attention_break_even)
        if not self._extend(seq, take) or seq.prefilled == len(seq.prompt):
            self._sched.chunking = None  # failed, or joined the batch
        return take

    def _extend(self, seq: _Sequence, take: int) -> bool:
        """Prefill the next `take` tokens of a prompt after its cache; at the prompt's end it joins the batch.
        False if the prefill failed (the request has ended)."""
        try:
            chunk, more = seq.prompt[seq.prefilled : seq.prefilled + take], len(seq.prompt) - seq.prefilled - take
            started = time.perf_counter()
            logits, seq.cache = prefill_chunk(self.model, chunk, seq.cache, more)
            self._measured(take, seq.prefilled, seconds := time.perf_counter() - started)
            log.debug("request %s: %d tokens at %d in %.3f s", seq.handle.id, take, seq.prefilled, seconds)
        except Exception as exc:
            log.exception("prefill failed for request %s", seq.handle.id)
            self._end(seq.handle, Failed(f"generation failed: {exc}"))
            self._flush()
            return False
        seq.prefilled += take
        if seq.prefilled == len(seq.prompt):
            cache, seq.cache = seq.cache, None
            mask = torch.ones((1, len(seq.prompt)), dtype=torch.long, device=logits.device)
            self._join([seq], logits, cache, mask)
        return True

    def _prefill(self, seqs: list[_Sequence]) -> None:
        try:
            started = time.perf_counter()
            logits, cache, mask = prefill(self.model, [seq.prompt for seq in seqs])
            self._measured(mask.numel(), 0, time.perf_counter() - started)
        except Exception as exc:
            if len(seqs) > 1:  # find the broken request: alone, only it fails
                for seq in seqs:
                    self._prefill([seq])
                return
            log.exception("prefill failed for request %s", seqs[0].handle.id)
            self._end(seqs[0].handle, Failed(f"generation failed: {exc}"))
            self._flush()
            return
        self._batchable = batchable(cache)
        if not self._batchable and len(seqs) > 1:
            # this model's cache cannot be batched after all: the first goes alone, the rest wait their turn
            for seq in reversed(seqs[1:]):
                self._requeue(seq)
            self._prefill(seqs[:1])
            return
        self._join(seqs, logits, cache, mask)

    def _join(self, seqs: list[_Sequence], logits: torch.Tensor, cache: Any, mask: torch.Tensor) -> None:
        """Prefilled sequences sample their first token and join the decode batch."""
        for seq in seqs:
            seq.history = History.of(seq.prompt, logits.shape[-1], seq.generator, logits.device)
        keep = self._sample_rows(seqs, logits)
        if self.prefix is not None and len(keep) < len(seqs):  # answered by their first token: keep their prompts
            self._flush()
            kept = set(keep)
            for i, seq in enumerate(seqs):
                if i not in kept:
                    self._remember(seq.prompt, cache, i, len(seq.prompt))
        if keep:
            self._batch.add(select_rows(cache, keep), mask[keep], self.max_batch_size)
            self._sched.running.extend(seqs[i] for i in keep)
        self._flush()  # first tokens go out now, not after the other prefills

    # -- decode

    def _decode(self, clean: bool = True) -> None:
        """One forward pass over every running request, then each samples its own token. `clean`: no prefill ran
        in this engine step (the thread tuner counts only such steps)."""
        running = self._sched.running
        rows = len(running)
        assert self.tuner is not None
        self.tuner.before_decode(rows)
        try:
            started = time.perf_counter()
            logits = decode_step(self.model, self._batch, [seq.tokens[-1] for seq in running])
            self.tuner.after_decode(rows, time.perf_counter() - started, clean)
        except Exception as exc:  # one forward pass for all: the failure cannot be pinned on one request
            log.exception("decode step failed")
            self._abandon_live(f"generation failed: {exc}")
            return
        self._keep(self._sample_rows(running, logits))

    def _sample_rows(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """Each sequence samples from its row of logits [B, V], constrained rows from what their grammar allows;
        returns the rows still running."""
        constrained = [i for i, seq in enumerate(seqs) if seq.matcher is not None]
        if constrained:
            try:
                matchers = [m for i in constrained if (m := seqs[i].matcher) is not None]
                apply_masks(logits, constrained, matchers)
                if (guard := self.config.loop_guard) is not None:
                    found = self._guard_penalties(
                        guard, [(i, seqs[i], m) for i, m in zip(constrained, matchers, strict=True)]
                    )
                    if found:  # one indexed update for the whole batch, not one per row
                        rows, ids, amounts = zip(*found, strict=True)
                        logits[list(rows), list(ids)] -= torch.tensor(amounts, dtype=logits.dtype, device=logits.device)
            except Exception as exc:  # one call for all constrained rows: the fault cannot be pinned on one
                log.exception("constraint masks failed")
                for i in constrained:
                    self._end(seqs[i].handle, Failed(f"generation failed: {exc}"))
                return [i for i in range(len(seqs)) if i not in constrained]
        keep = []
        for i, seq in enumerate(seqs):
            try:  # a fault in one request's sampling or detokenizing ends only that request
                assert seq.history is not None
                if self._advance(seq, sample(logits[i], seq.params, seq.history, self.model.eos_token_ids)):
                    keep.append(i)
            except Exception as exc:
                log.exception("sampling failed for request %s", seq.handle.id)
                self._end(seq.handle, Failed(f"generation failed: {exc}"))
        return keep

    def _guard_penalties(
        self, guard: LoopGuard, rows: list[tuple[int, _Sequence, Matcher]]
    ) -> list[tuple[int, int, float]]:
        """(row, token id, amount) for each token the loop guard lowers in the guarded rows it acts on by now (JSON
        answers, by default from half their budget: generation/loop_guard.py)."""
        return [
            (i, token, amount)
            for i, seq, matcher in rows
            if matcher.symbols is not None and guard.acts(len(seq.tokens), self._answer_budget(seq))
            for token, amount in repeat_penalties(seq.tokens, guard, matcher.symbols).items()
        ]

    def _answer_budget(self, seq: _Sequence) -> int:
        """The most tokens the sequence's answer may have: its max_new_tokens, or what the context leaves."""
        return min(seq.params.max_new_tokens, self.model.context_length - len(seq.prompt))

    def _advance(self, seq: _Sequence, sampled: Sampled) -> bool:
        """Record a sampled token and stream its text; False once the sequence has finished."""
        lm = self.model
        token = sampled.token
        seq.tokens.append(token)
        assert seq.history is not None
        seq.history.add(token)
        is_eos = token in lm.eos_token_ids
        reason: str | None = "stop" if is_eos else None
        if seq.matcher is not None:
            seq.matcher.consume(token)
            if (error := seq.matcher.error) is not None:
                raise RuntimeError(f"the constraint refused a token: {error}")
            if seq.matcher.done:  # the grammar is complete: the answer is whole
                reason = "stop"
        if reason is None and len(seq.tokens) >= self._answer_budget(seq):
            reason = "length"
        if seq.params.logprobs is not None and not is_eos:
            seq.pending.append(self._token_texts().entry(sampled))
        emitted = seq.output.push(None if is_eos else token, last=reason is not None, cut=reason == "length")
        out = emitted.text
        if emitted.stop is not None:
            reason = "stop"
            seq.pending.clear()  # their text was cut at the stop string
        if reason is not None and not out:
            # at the end, the entries of tokens with no text of their own (special ones) still go out; those of a
            # character cut short by the end do not, as its bytes do not: the entries' bytes join to the answer
            seq.pending = [entry for entry in seq.pending if not entry.bytes]
        if out or emitted.calls or (seq.pending and reason is not None):
            self._emit(seq.handle, Delta(out, tuple(seq.pending), tuple(emitted.calls)))
            seq.pending.clear()
        if reason is None:
            return True
        if seq.output.called:  # whole calls went out: the client has tools to run, even when the length cut it after
            reason = "tool_calls"
        done = Finished(
            reason, len(seq.prompt), len(seq.tokens), seq.queue_s, stop_sequence=emitted.stop, cached_tokens=seq.hit
        )
        self._end(seq.handle, done)
        return False
