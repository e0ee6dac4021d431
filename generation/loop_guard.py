"""A JSON answer kept from going round in circles until `max_tokens`.

A grammar holds each token to the schema but cannot make a small model stop: given an open array, a recursive node or
a string, the bundled 135M model repeats itself (`{"x":1,"y":1},{"x":2,"y":2},…`, the same ingredient again, a VAT id
of `1234567890` over and over) until the answer is cut and no longer parses (bench/README.md, "Structured output").
So a constrained row's logits are lowered for each token that would carry on a span the answer has already written:
the longer the repeated span, the larger the penalty (`multiplier * base ** (length - allowed)`, the "DRY" rule of
llama.cpp's sampler), so an exact loop is left within a few tokens while the one-or-two-token echoes every JSON
document has (`","`, `":`) cost nothing. Digits count as one symbol when spans are compared, so counting
(`1, 2, 3, …`) is a loop too. The mask comes first: a token the grammar needs is still the only one it allows, and
the answer stays valid whatever the penalty does.

Spans are compared token by token. Comparing bytes instead (so that `{` `"` and `{"` are the same text), or counting
only blocks repeated back to back, did worse on the benchmark's schemas (bench/README.md), so this is the rule kept."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIGITS = -1  # the class shared by every token that is digits alone


@dataclass(frozen=True)
class LoopGuard:
    """The penalty's shape: nothing for a repeat shorter than `allowed` tokens, then `multiplier`, times `base` with
    each token more. `longest` bounds the span compared and `window` how far back the answer is searched, so the
    work per step stays small however long the answer."""

    multiplier: float = 1.0
    base: float = 2.0
    allowed: int = 3
    longest: int = 48
    window: int = 512


def token_classes(pieces: list[bytes]) -> np.ndarray:
    """Each token's symbol when spans are compared [V]: its own id, or DIGITS for a token of digits alone (around
    whitespace)."""
    classes = np.arange(len(pieces), dtype=np.int64)
    for i, piece in enumerate(pieces):
        core = piece.strip()
        if core and all(48 <= b <= 57 for b in core):  # ASCII digits only
            classes[i] = DIGITS
    return classes


def repeat_penalties(classes: np.ndarray, tokens: np.ndarray, guard: LoopGuard) -> dict[int, float]:
    """token id → how much its logit is lowered, for an answer of `tokens` [T] whose symbols are `classes` [T].

    Every earlier place where the answer's last symbols occurred before is a candidate; the token that followed
    there would repeat the span once more. The candidates are narrowed one symbol further back at a time, so each
    pass is one vectorised comparison and the loop ends as soon as no earlier span matches."""
    n = len(classes)
    found: dict[int, float] = {}
    if n < max(guard.allowed, 2):
        return found
    ends = np.flatnonzero(classes[:-1] == classes[-1])  # [K] earlier positions matching the last symbol
    length = 1
    while ends.size and length <= guard.longest:
        if length >= guard.allowed:
            penalty = guard.multiplier * guard.base ** (length - guard.allowed)
            for token in tokens[ends + 1].tolist():  # a longer match is met later and raises the penalty
                found[token] = penalty
        back = ends - length  # the symbol one further back in each candidate span
        ends = ends[back >= 0]
        back = back[back >= 0]
        ends = ends[classes[back] == classes[n - 1 - length]]
        length += 1
    return found
