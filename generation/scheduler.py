"""Which requests run: the queue, admission into the batch, and how much of a prompt is prefilled each step.

Plain code over sequences that have a `prompt` (token ids) and a `prefilled` count: it decides, the engine
(engine.py) runs the model. Each step, a prompt being prefilled in chunks gets the next chunk first; then waiting
requests are admitted in order while the step's prompt-token budget and the batch's free rows allow. A prompt over
the budget starts its own chunks only in a step that admits nothing else; shorter prompts behind it do not wait.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

MIN_CHUNK = 16  # tokens: fewer per step would spend more on the step than on the prompt


class Queued(Protocol):
    prompt: list[int]
    prefilled: int  # prompt tokens already in its cache (chunked prefill)
    cached: int  # prompt tokens the prefix cache holds (looked up when the queue reaches it): not to prefill
    submitted: float  # time.monotonic() when it was queued


S = TypeVar("S", bound=Queued)


def chunk_size(full: int, offset: int, break_even: int) -> int:
    """Tokens of a prompt's chunk that starts `offset` tokens in: a token there also attends to `offset` others, so
    the chunk shrinks to cost about what `full` tokens cost at the start. `break_even` is the model's prompt length
    at which attention costs a token as much as the rest of its layer. A pure function of the prompt, so a prompt is
    always cut the same way, whatever else the server is doing."""
    return max(MIN_CHUNK, min(full, round(full * break_even / (break_even + offset))))


def prefill_weight(tokens: int, offset: int, break_even: int) -> int:
    """Tokens at a prompt's start that cost what `tokens` tokens `offset` deep cost (the inverse of `chunk_size`): the
    rest of a prompt whose start the prefix cache holds attends to all of that start too."""
    return -(-tokens * (break_even + offset) // break_even)


class PrefillClock:
    """The measured cost of a prompt token on this device, and the chunk that fits a time budget."""

    def __init__(self, break_even: int, seconds_per_token: float | None = None) -> None:
        self.break_even = break_even
        self.token_s = seconds_per_token  # a token at a prompt's start (moving average); None: not measured yet

    def measured(self, tokens: int, offset: int, seconds: float) -> None:
        """A prefill of `tokens` (padding counted: it is computed) `offset` tokens into its prompt took `seconds`.
        A token deeper in also attends to those before it, which `chunk_size` counts as (K + offset) / K tokens at
        the start, and so does this."""
        if tokens < MIN_CHUNK:  # a few tokens cost their step's fixed part more than their own
            return
        k = self.break_even
        cost = seconds / (tokens * (k + offset) / k)
        self.token_s = cost if self.token_s is None else 0.7 * self.token_s + 0.3 * cost

    def chunk_tokens(self, ceiling: int, seconds: float) -> int:
        """A full chunk: `ceiling` tokens, fewer where they would take more than `seconds` here."""
        if self.token_s is None or not ceiling:
            return ceiling
        return max(MIN_CHUNK, min(ceiling, int(seconds / self.token_s)))


@dataclass
class Admission(Generic[S]):
    """What a step prefills besides the running chunked prompt."""

    whole: list[S] = field(default_factory=list)  # prompts prefilled in one piece this step, in queue order
    chunked: S | None = None  # a prompt over the budget that starts its chunks now
    room: int = 0  # the tokens its first chunk may take


class Scheduler(Generic[S]):
    """The waiting queue, the running rows and the one prompt being prefilled in chunks."""

    def __init__(self) -> None:
        self.waiting: deque[S] = deque()
        self.running: list[S] = []  # row i of the decode batch is running[i]
        self.chunking: S | None = None

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting and self.chunking is None

    def slots_taken(self, new: list[S]) -> int:
        return len(self.running) + len(new) + (self.chunking is not None)

    def admit(
        self,
        budget: int | None,
        max_rows: int,
        batchable: bool,
        take: Callable[[S], bool],
        look: Callable[[S], None] | None = None,
        break_even: int = 1,
    ) -> Admission[S]:
        """Take waiting requests into the batch while `budget` prompt tokens (None: no limit) and `max_rows` rows
        allow; `batchable` False: one request at a time. `take(seq)` counts a request as running and says False if
        it ended meanwhile (it leaves the queue all the same). `look(seq)` updates `seq.cached` before its prompt is
        weighed: only the tokens the prefix cache does not hold are prefilled, each weighing more the deeper it sits
        (`prefill_weight` with the model's `break_even`), so a long cached history cannot pass the budget in one
        piece."""
        picked: Admission[S] = Admission()
        taken: set[int] = set()
        used = 0
        for seq in list(self.waiting):
            if self.slots_taken(picked.whole) >= max_rows:
                break
            if (self.running or picked.whole or self.chunking) and not batchable:
                break  # this model's cache cannot be batched: one request at a time
            room = None if budget is None else budget - used  # prompt tokens this step may still prefill
            if room is not None and room <= 0:
                break  # the rest of the queue waits for the next step's budget
            if look is not None:
                look(seq)
            need = len(seq.prompt) - seq.cached
            if seq.cached:
                need = prefill_weight(need, seq.cached, break_even)
            long = room is not None and need > room
            if long and (picked.whole or self.chunking is not None):
                continue  # it starts in a step with room for it; shorter prompts behind it need not wait
            taken.add(id(seq))
            if not take(seq):
                continue
            if room is not None and long:  # prefilled a chunk per step from now on
                picked.chunked, picked.room = seq, room
                self.chunking = seq
                break
            picked.whole.append(seq)
            used += need
        if taken:
            self.waiting = deque(seq for seq in self.waiting if id(seq) not in taken)
        return picked

    def next_chunk(self, budget: int, full: int, break_even: int) -> int:
        """Tokens of the chunked prompt to prefill now: at most `budget`, and what its position allows."""
        seq = self.chunking
        assert seq is not None
        return min(budget, chunk_size(full, seq.prefilled, break_even), len(seq.prompt) - seq.prefilled)

    def expired(self, timeout: float, now: float | None = None) -> list[S]:
        """Take out the requests that waited longer than `timeout` seconds for a slot."""
        now = time.monotonic() if now is None else now
        out = []
        while self.waiting and now - self.waiting[0].submitted > timeout:
            out.append(self.waiting.popleft())
        return out

    def drop_waiting(self, gone: Callable[[S], bool]) -> list[S]:
        """Take out the waiting requests for which `gone` holds. `gone` is asked once a request: a request cancelled
        from another thread meanwhile is either taken out and returned, or stays for the next step."""
        out: list[S] = []
        stay: deque[S] = deque()
        for seq in self.waiting:
            (out if gone(seq) else stay).append(seq)
        if out:
            self.waiting = stay
        return out

    def keep(self, rows: list[int]) -> None:
        """The running requests at these rows stay; the others have left the batch."""
        self.running = [self.running[i] for i in rows]
