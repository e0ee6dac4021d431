"""The loop guard's penalties: what an answer repeating itself loses, and what ordinary JSON echoes do not."""

from __future__ import annotations

from dataclasses import replace

from generation.loop_guard import DIGITS, FROM_THE_START, LATE, LoopGuard, repeat_penalties, token_symbols

GUARD = LoopGuard(multiplier=1.0, base=2.0, allowed=3)  # word for word unless given symbols


def penalties(tokens: list[int], guard: LoopGuard = GUARD) -> dict[int, float]:
    return repeat_penalties(tokens, guard)


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


def test_word_for_word_counting_is_not_a_loop() -> None:
    # {"x": 1 } , {"x": 2 } , {"x": 3 } → no span of 3 tokens was written before: a list that counts is left alone
    brace, key, close, comma = 100, 101, 102, 103
    answer = [brace, key, 1, close, comma, brace, key, 2, close, comma, brace, key, 3, close]
    assert penalties(answer) == {}
    # the same record again, word for word, is a repeat: the comma that would start a third copy is lowered
    same = [brace, key, 1, close, comma, brace, key, 1, close]
    assert penalties(same) == {comma: 2.0 ** (4 - 3)}


def test_no_span_longer_than_longest_is_compared() -> None:
    guard = LoopGuard(allowed=3, longest=4)
    # the span matches 10 tokens back, but its penalty is that of `longest` tokens (and so is the work)
    tokens = [*range(10), 99, *range(10)]
    assert penalties(tokens, guard) == {99: 2.0 ** (4 - 3)}


PIECES = [b"0", b"1", b"2", b"3", b" 42", b"{", b'"x":', b"}", b",", b"1a"]


def test_with_digits_as_one_symbol_counting_is_a_loop() -> None:
    # {"x": 1 } , {"x": 2 } , {"x": 3 } → once digits are one symbol, the answer's last 9 symbols `{"x": N } , {"x":
    # N }` were written before, followed by the comma: the comma that would start a fourth record is lowered
    symbols = token_symbols(PIECES)
    assert symbols.tolist() == [DIGITS] * 5 + [5, 6, 7, 8, 9]  # "1a" is not digits alone
    brace, key, close, comma = 5, 6, 7, 8
    answer = [brace, key, 1, close, comma, brace, key, 2, close, comma, brace, key, 3, close]
    counting = repeat_penalties(answer, GUARD, symbols)
    assert counting == {comma: 2.0 ** (9 - 3)}
    # word for word (no symbols, or a guard that does not count digits as one) it is left alone
    assert repeat_penalties(answer, GUARD) == {}
    assert repeat_penalties(answer, replace(GUARD, digits=False), symbols) == {}


def test_the_default_guard_waits_for_half_the_budget() -> None:
    assert not LATE.acts(199, 400) and LATE.acts(200, 400)
    assert FROM_THE_START.acts(0, 400)
    assert LATE.digits and not FROM_THE_START.digits


def test_digits_are_never_lowered() -> None:
    # a timestamp's zeros, and records whose numbers match earlier ones digit for digit: the guard could only change
    # the numbers, which ends no loop; what it lowers is the structure between them (here the comma)
    symbols = token_symbols(PIECES)
    zero, one, brace, key, close, comma = 0, 1, 5, 6, 7, 8
    stamp = [key, one, *[zero] * 9]
    for guard in (LATE, FROM_THE_START):
        assert repeat_penalties(stamp, guard, symbols) == {}
    # word for word, without symbols to say which tokens are digits, the zeros would be lowered
    assert zero in repeat_penalties(stamp, FROM_THE_START)
    records = [brace, key, one, zero, close, comma, brace, key, one, zero, close, comma, brace, key, one]
    for guard in (LATE, FROM_THE_START):
        lowered = repeat_penalties(records, guard, symbols)
        assert zero not in lowered and one not in lowered
    same = [*records, zero, close]  # a third record like the others: the comma of a fourth is lowered
    assert comma in repeat_penalties(same, LATE, symbols) and comma in repeat_penalties(same, FROM_THE_START, symbols)
