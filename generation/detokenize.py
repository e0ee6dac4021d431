"""Token ids to client text: incremental detokenization that never splits a character, and stop strings held
back until they can no longer match."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


# How many prompt tokens the detokenizer decodes along with the first new tokens, so that
# tokenizers which drop a word's leading space at the start of a decode keep it.
_CONTEXT_TOKENS = 4


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that never split a character.

    Decodes a small window of ids and emits only once the window's text grows and does not
    end in U+FFFD, i.e. once the bytes of a multi-byte character have all arrived.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # start of the decode window
        self._read = len(self._ids)  # end of the text already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def push(self, token_id: int) -> str:
        """Add one token; return the new complete text (possibly empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Text still held at the end; an unfinished character at the very end is dropped."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :].rstrip(REPLACEMENT)


class StopMatcher:
    """Holds back text that could still become a stop string, so none ever reaches a client."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """Add text; return (text safe to emit, the stop string found or None). Of stop strings found in the same
        text, the one that starts first ends it (of two starting there, the one listed first)."""
        if not self._stops:
            return text, None
        self._pending += text
        hits = [(at, i) for i, at in enumerate(self._pending.find(s) for s in self._stops) if at >= 0]
        if hits:
            at, first = min(hits)
            out, self._pending = self._pending[:at], ""
            return out, self._stops[first]
        hold = self._partial_suffix()
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, None

    def _partial_suffix(self) -> int:
        """Length of the longest end of pending text that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """The held text, once generation has ended without a stop string."""
        out, self._pending = self._pending, ""
        return out
