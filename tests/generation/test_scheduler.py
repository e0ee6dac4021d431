"""The scheduler as plain code, without a model: who is admitted, who waits, when a long prompt starts its chunks,
and how big a chunk is."""

from __future__ import annotations

from dataclasses import dataclass, field

from generation.scheduler import MIN_CHUNK, PrefillClock, Scheduler, chunk_size, prefill_weight


@dataclass
class Seq:
    prompt: list[int]
    prefilled: int = 0
    cached: int = 0
    submitted: float = 0.0
    name: str = field(default="")


def queue(*lengths: int) -> Scheduler[Seq]:
    sched: Scheduler[Seq] = Scheduler()
    sched.waiting.extend(Seq([0] * n, name=f"s{i}") for i, n in enumerate(lengths))
    return sched


def names(seqs: list[Seq]) -> list[str]:
    return [s.name for s in seqs]


def test_short_prompts_are_admitted_together_within_the_budget() -> None:
    sched = queue(100, 200, 300, 50)
    picked = sched.admit(budget=512, max_rows=8, batchable=True, take=lambda s: True)
    # 100 + 200 fit; 300 would pass the budget and is long for what is left, so it waits; 50 still fits
    assert names(picked.whole) == ["s0", "s1", "s3"]
    assert picked.chunked is None
    assert names(list(sched.waiting)) == ["s2"]


def test_only_the_tokens_the_prefix_cache_lacks_count_against_the_budget() -> None:
    sched = queue(100, 2000, 300)
    hits = {"s1": 1980}  # a long conversation whose history is cached: 20 tokens left to prefill

    def look(seq: Seq) -> None:
        seq.cached = hits.get(seq.name, 0)

    picked = sched.admit(budget=512, max_rows=8, batchable=True, take=lambda s: True, look=look, break_even=2048)
    assert names(picked.whole) == ["s0", "s1", "s2"] and picked.chunked is None
    # without the cache the long one starts its own chunks in a later step
    sched = queue(100, 2000, 300)
    assert names(sched.admit(budget=512, max_rows=8, batchable=True, take=lambda s: True).whole) == ["s0", "s2"]


def test_a_new_turn_deep_in_a_cached_history_weighs_what_its_attention_costs() -> None:
    """500 new tokens after 30000 cached ones each attend to all of them: about 15 times what 500 tokens at a
    prompt's start cost, so they are prefilled in chunks that shrink with the depth, not at once."""
    assert prefill_weight(500, 30000, 2048) == 7825 and prefill_weight(500, 0, 2048) == 500
    sched = queue(30500)
    sched.waiting[0].cached = 30000
    picked = sched.admit(
        budget=512, max_rows=8, batchable=True, take=lambda s: True, look=lambda s: None, break_even=2048
    )
    assert picked.chunked is not None and picked.whole == []
    picked.chunked.prefilled = 30000  # restored from the cache
    assert sched.next_chunk(512, 512, 2048) == chunk_size(512, 30000, 2048) < 40


def test_a_long_prompt_starts_its_chunks_only_in_a_step_that_admits_nothing_else() -> None:
    sched = queue(2000, 30)
    first = sched.admit(budget=512, max_rows=8, batchable=True, take=lambda s: True)
    assert first.chunked is not None and first.chunked.name == "s0" and first.room == 512
    assert sched.chunking is first.chunked and first.whole == []
    # while it is chunked, the short one behind it gets in; a second long one waits its turn
    sched.waiting.append(Seq([0] * 3000, name="long2"))
    second = sched.admit(budget=512 - 400, max_rows=8, batchable=True, take=lambda s: True)
    assert names(second.whole) == ["s1"] and second.chunked is None
    assert names(list(sched.waiting)) == ["long2"]


def test_rows_and_unbatchable_models_limit_admission() -> None:
    sched = queue(10, 10, 10)
    sched.running = [Seq([1])]
    assert names(sched.admit(None, max_rows=2, batchable=True, take=lambda s: True).whole) == ["s0"]
    one_at_a_time = queue(10, 10)
    assert names(one_at_a_time.admit(None, 8, batchable=False, take=lambda s: True).whole) == ["s0"]
    busy = queue(10)
    busy.running = [Seq([1])]
    assert busy.admit(None, 8, batchable=False, take=lambda s: True).whole == []


def test_a_request_ended_while_waiting_leaves_the_queue_without_a_row() -> None:
    sched = queue(10, 10)
    picked = sched.admit(None, 8, True, take=lambda s: s.name != "s0")
    assert names(picked.whole) == ["s1"] and not sched.waiting


def test_requests_that_waited_too_long_expire_in_order() -> None:
    sched = queue(1, 1, 1)
    for i, seq in enumerate(sched.waiting):
        seq.submitted = float(i)
    assert names(sched.expired(timeout=10.0, now=11.5)) == ["s0", "s1"]
    assert names(list(sched.waiting)) == ["s2"]


def test_chunks_shrink_deeper_into_a_prompt_and_never_below_the_minimum() -> None:
    sizes = [chunk_size(512, offset, 1024) for offset in (0, 512, 1024, 4096, 10**6)]
    assert sizes[0] == 512 and sizes == sorted(sizes, reverse=True)
    assert sizes[2] == 256 and sizes[-1] == MIN_CHUNK
    sched = queue()
    sched.chunking = Seq([0] * 600, prefilled=500)
    assert sched.next_chunk(budget=512, full=512, break_even=1024) == 100  # what is left of the prompt


def test_the_chunk_fits_the_time_budget_from_measured_prefills() -> None:
    clock = PrefillClock(break_even=1024)
    assert clock.chunk_tokens(512, seconds=0.5) == 512  # nothing measured yet: the ceiling
    clock.measured(tokens=256, offset=0, seconds=1.0)  # 3.9 ms a token: 0.5 s holds 128
    assert clock.chunk_tokens(512, seconds=0.5) == 128
    clock.measured(tokens=4, offset=0, seconds=10.0)  # too few tokens to tell: ignored
    assert clock.chunk_tokens(512, seconds=0.5) == 128
    clock.measured(tokens=256, offset=1024, seconds=1.0)  # deeper in, the same time means cheaper tokens
    assert clock.chunk_tokens(512, seconds=0.5) > 128


def test_a_request_cancelled_while_the_queue_is_swept_is_never_lost() -> None:
    """Cancellation comes from the event loop's thread: if it lands while the waiting queue is swept, the request is
    either taken out (and ended by the engine) or still waiting, never dropped without an end."""
    sched = queue(1, 1, 1)
    asked: dict[str, int] = {}

    def cancelled_midway(seq: Seq) -> bool:  # s0 was cancelled; s1 turns cancelled right after it was first asked
        asked[seq.name] = asked.get(seq.name, 0) + 1
        return seq.name == "s0" or (seq.name == "s1" and asked[seq.name] > 1)

    out = sched.drop_waiting(cancelled_midway)
    assert names(out)[:1] == ["s0"]
    assert sorted(names(out) + names(list(sched.waiting))) == ["s0", "s1", "s2"]
