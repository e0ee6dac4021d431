"""A JSON answer kept from going round in circles until `max_tokens`.

A grammar holds each token to the schema but cannot make a small model stop: given an open array, a recursive node or
a string, the bundled 135M model can repeat itself (`{"x":1,"y":1},{"x":2,"y":2},…`, `茹茹茹…`, ever deeper
`children`, a VAT id of digits) until the answer is cut and no longer parses (bench/README.md, "Structured output").
So a constrained row's logits are lowered for each token that would carry on a span the answer has already written:
the longer the repeated span, the larger the penalty (`multiplier * base ** (length - allowed)`, the "DRY" rule of
llama.cpp's sampler), so an exact loop is left within a few tokens while the one-or-two-token echoes every JSON
document has (`","`, `":`) cost nothing. The mask comes first: a token the grammar needs is still the only one it
allows, and the answer stays valid whatever the penalty does.

A guard cannot tell a loop from a list that repeats on purpose (ten numbers asked for, three users all "active"). So
by default (`LATE`) it waits until the answer has used half of its token budget: an answer that gets there while
repeating itself is on its way to being cut by `max_tokens`, and one that ends before is never touched. From there,
digits count as one symbol, so that counting (`{"x":1,"y":1},{"x":2,"y":2},…`, `27. Add 28. Add …`) is a loop too.
`FROM_THE_START` guards every token and compares spans word for word, so that lists that count are left alone; it
still ends lists of records alike after their first field early (bench/README.md).

Either way a digit is never lowered: a loop is left by what comes between its numbers (the `,{"` of one record more,
the ` Add` of one step more), and lowering digits would only change the numbers an answer gives (a timestamp's
zeros, a record's id like the one before it) while it still says `stop`. A string of digits that goes on for ever
is cut by `max_tokens`, as it would be with the guard off."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DIGITS = -1  # the symbol shared by every token that is digits alone, when digits count as one


@dataclass(frozen=True)
class LoopGuard:
    """When the guard acts and the penalty's shape: from `start` (a share of the answer's token budget) on, nothing
    for a repeat shorter than `allowed` tokens, then `multiplier`, times `base` with each token more; `digits`: every
    token of digits alone is the same symbol. `longest` bounds the span compared and `window` how far back the answer
    is searched, so the work per step stays small however long the answer."""

    start: float = 0.5
    digits: bool = True
    multiplier: float = 1.0
    base: float = 2.0
    allowed: int = 3
    longest: int = 48
    window: int = 512

    def acts(self, written: int, budget: int) -> bool:
        """Whether an answer of `written` tokens out of a budget of `budget` is guarded."""
        return written >= self.start * budget


LATE = LoopGuard()  # the default: from half the budget on, digits one symbol
FROM_THE_START = LoopGuard(start=0.0, digits=False)  # `--loop-guard on`: every token, word for word


def token_symbols(pieces: Sequence[bytes]) -> np.ndarray:
    """Each token's symbol when digits count as one [V]: its own id, or DIGITS for a token of ASCII digits alone
    (whitespace around them allowed)."""
    symbols = np.arange(len(pieces), dtype=np.int64)
    for i, piece in enumerate(pieces):
        core = piece.strip()
        if core and core.isdigit():  # bytes.isdigit: ASCII digits only
            symbols[i] = DIGITS
    return symbols


def repeat_penalties(answer: Sequence[int], guard: LoopGuard, symbols: np.ndarray | None = None) -> dict[int, float]:
    """token id → how much its logit is lowered, for an answer of `answer`'s tokens (its last `window` looked at);
    `symbols` [V]: each token's symbol (`token_symbols`): spans are compared by them when `guard.digits`, and a digit
    is never lowered. Without `symbols`, spans are compared word for word and every token may be lowered.

    Every earlier place where the answer's last symbols occurred before is a candidate; the token that followed there
    would repeat the span once more. The candidates are narrowed one symbol further back at a time, so each pass is
    one vectorised comparison and the loop ends as soon as no earlier span matches."""
    found: dict[int, float] = {}
    if len(answer) < max(guard.allowed, 2):
        return found
    tokens = np.asarray(answer[-guard.window :], dtype=np.int64)  # [T]
    seen, lowered = tokens, np.ones(len(tokens), dtype=np.bool_)  # [T] what is compared; who may be lowered
    if symbols is not None:
        # (an id past the tokenizer's, a model's padding, is never allowed by the mask; clipped rather than trusted)
        classes = symbols[np.minimum(tokens, len(symbols) - 1)]  # [T]
        lowered = classes != DIGITS
        seen = classes if guard.digits else tokens
    n = len(seen)
    ends = np.flatnonzero(seen[:-1] == seen[-1])  # [K] earlier positions of the last symbol
    length = 1
    while ends.size and length <= guard.longest:
        if length >= guard.allowed:
            penalty = guard.multiplier * guard.base ** (length - guard.allowed)
            follow = ends + 1
            for token in tokens[follow[lowered[follow]]].tolist():  # a longer match is met later, raising it
                found[token] = penalty
        back = ends - length  # one symbol further back in each candidate span
        ends = ends[back >= 0]
        back = back[back >= 0]
        ends = ends[seen[back] == seen[n - 1 - length]]
        length += 1
    return found
