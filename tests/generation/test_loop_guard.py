"""The loop guard's penalties: what an answer repeating itself loses, and what ordinary JSON echoes do not."""

from __future__ import annotations

import numpy as np

from generation.loop_guard import DIGITS, LoopGuard, repeat_penalties, token_classes

GUARD = LoopGuard(multiplier=1.0, base=2.0, allowed=3)


def penalties(tokens: list[int], classes: list[int] | None = None, guard: LoopGuard = GUARD) -> dict[int, float]:
    ids = np.asarray(tokens, dtype=np.int64)
    return repeat_penalties(ids if classes is None else np.asarray(classes, dtype=np.int64), ids, guard)


def test_the_token_that_carries_a_loop_on_loses_more_the_longer_the_loop() -> None:
    # 9 | 1 2 3 4 | 1 2 3 4 | 1 2 3 → the next 4 repeats "1 2 3 4 1 2 3" (7 tokens) once more
    assert penalties([9, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3]) == {4: 2.0 ** (7 - 3)}
    # one round fewer: the span is "1 2 3" (3 tokens), the smallest that costs anything
    assert penalties([9, 1, 2, 3, 4, 1, 2, 3]) == {4: 1.0}


def test_short_echoes_cost_nothing() -> None:
    # JSON repeats `","` and `":` all the time: a repeat of fewer than `allowed` tokens is free
    assert penalties([1, 2, 7, 1, 2]) == {}
    assert penalties([5, 6, 7, 8]) == {}
    assert penalties([3]) == {}


def test_each_continuation_is_penalised_by_its_own_longest_match() -> None:
    # "1 2 3" was followed by 4 once (after a 9) and by 5 once (after an 8); the answer now ends "8 1 2 3"
    tokens = [9, 1, 2, 3, 4, 8, 1, 2, 3, 5, 8, 1, 2, 3]
    assert penalties(tokens) == {4: 1.0, 5: 2.0}


def test_counting_is_a_loop_when_digits_are_one_symbol() -> None:
    # {"x": 1 } , {"x": 2 } → the next "," would repeat `{"x": <digits> }` once more
    pieces = [b"{", b'"x":', b"1", b"2", b"}", b",", b" 3", b"a1"]
    classes = token_classes(pieces)
    assert classes.tolist() == [0, 1, DIGITS, DIGITS, 4, 5, DIGITS, 7]
    answer = [0, 1, 2, 4, 5, 0, 1, 3, 4]
    assert penalties(answer, classes[answer].tolist()) == {5: 2.0}
    assert penalties(answer) == {}  # compared token by token, 1 and 2 differ and nothing repeats


def test_no_span_longer_than_longest_is_compared() -> None:
    guard = LoopGuard(allowed=3, longest=4)
    # the span matches 10 tokens back, but its penalty is that of `longest` tokens (and so is the work)
    tokens = [*range(10), 99, *range(10)]
    assert penalties(tokens, guard=guard) == {99: 2.0 ** (4 - 3)}
