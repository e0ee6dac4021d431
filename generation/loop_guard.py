"""A JSON answer kept from going round in circles until `max_tokens` (`--loop-guard on`; off by default).

A grammar holds each token to the schema but cannot make a small model stop: given an open array, a recursive node or
a string, the bundled 135M model can repeat itself word for word (`茹茹茹…`, ever deeper `children` under names it
used before, a VAT id of `1234567890` over and over) until the answer is cut and no longer parses (bench/README.md,
"Structured output"). So a constrained row's logits are lowered for each token that would carry on a span the
answer has already written: the longer the repeated span, the larger the penalty (`multiplier * base ** (length -
allowed)`, the "DRY" rule of llama.cpp's sampler), so an exact loop is left within a few tokens while the
one-or-two-token echoes every JSON document has (`","`, `":`) cost nothing. The mask comes first: a token the
grammar needs is still the only one it allows, and the answer stays valid whatever the penalty does.

Spans are compared token by token, word for word. Counting digits as one symbol also caught counting loops
(`{"x":1,"y":1},{"x":2,"y":2},…`) but cut lists that count on purpose (ten numbers asked for, five given); bytes
instead of tokens, or only blocks repeated back to back, did worse on the benchmark's schemas (bench/README.md).

It cannot tell a loop from a list that repeats on purpose: records alike but for their first field (three users, all
`"status":"active"`) end after the second, still valid but not what the model would have written. Hence off unless
asked for (docs/design.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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


def repeat_penalties(answer: Sequence[int], guard: LoopGuard) -> dict[int, float]:
    """token id → how much its logit is lowered, for an answer of `answer`'s tokens (its last `window` looked at).

    Every earlier place where the answer's last tokens occurred before is a candidate; the token that followed there
    would repeat the span once more. The candidates are narrowed one token further back at a time, so each pass is
    one vectorised comparison and the loop ends as soon as no earlier span matches."""
    found: dict[int, float] = {}
    if len(answer) < max(guard.allowed, 2):
        return found
    tokens = np.asarray(answer[-guard.window :], dtype=np.int64)  # [T]
    n = len(tokens)
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # [K] earlier positions of the last token
    length = 1
    while ends.size and length <= guard.longest:
        if length >= guard.allowed:
            penalty = guard.multiplier * guard.base ** (length - guard.allowed)
            for token in tokens[ends + 1].tolist():  # a longer match is met later and raises the penalty
                found[token] = penalty
        back = ends - length  # one token further back in each candidate span
        ends = ends[back >= 0]
        back = back[back >= 0]
        ends = ends[tokens[back] == tokens[n - 1 - length]]
        length += 1
    return found
