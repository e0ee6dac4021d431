"""One request's output pipeline: token ids become client text through the detokenizer (never half a character),
the model family's answer stream (its post-processing, applied as text arrives) and the stop strings (held back
until they can no longer match). What comes out concatenates to the final answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from generation.detokenize import IncrementalDecoder, StopMatcher
from models.chat_format import TextStream


class Output:
    """Turns one request's sampled tokens into its text deltas and tells when the text ends it."""

    def __init__(self, tokenizer: Any, prompt: Sequence[int], answer: TextStream, stops: Sequence[str]) -> None:
        self._decoder = IncrementalDecoder(tokenizer, prompt)
        self._answer = answer
        self._stops = StopMatcher(stops)

    def push(self, token: int | None, last: bool) -> tuple[str, bool]:
        """Add a token (None: an end-of-sequence token, which has no text); `last`: generation ends here (EOS or a
        length limit), so whatever is held back goes out. Returns the text to send and whether a stop string
        ended the answer (the text then stops before it)."""
        text = "" if token is None else self._decoder.push(token)
        if last:
            text += self._decoder.flush()
        text = self._answer.push(text) + (self._answer.flush() if last else "")
        out, hit = self._stops.push(text)
        if last and not hit:
            out += self._stops.flush()
        return out, hit
