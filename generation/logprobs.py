"""Logprob entries in the shape the doors send: each token's text and raw bytes (a token may hold part of a
character; the bytes of an answer's tokens join to its UTF-8), its log-probability and the likeliest alternatives."""

from __future__ import annotations

import logging
from typing import Any

from generation.constraints import grammars_for
from generation.events import TokenLogprob, TopLogprob
from generation.sampling import Sampled

log = logging.getLogger(__name__)


class TokenTexts:
    """Tokens' bytes and text for one model's tokenizer."""

    def __init__(self, tokenizer: Any, eos: tuple[int, ...] = ()) -> None:
        self._tokenizer = tokenizer
        try:  # llguidance reads any Hugging Face fast tokenizer's vocabulary as bytes
            self._ll: Any = grammars_for(tokenizer, eos).tokenizer
        except Exception:  # a model's own tokenizer (ChatGLM-6B): its decoded text, whole characters only
            log.info("logprobs: token bytes from decoded text (the tokenizer is not a Hugging Face fast one)")
            self._ll = None

    def bytes(self, token: int) -> bytes:
        if self._ll is not None:
            return bytes(self._ll.decode_bytes([token]))
        return str(self._tokenizer.decode([token])).encode()

    def top(self, token: int, logprob: float) -> TopLogprob:
        raw = self.bytes(token)
        return TopLogprob(raw.decode("utf-8", "replace"), logprob, tuple(raw))

    def entry(self, sampled: Sampled) -> TokenLogprob:
        chosen = self.top(sampled.token, sampled.logprob)
        alternatives = tuple(self.top(t, lp) for t, lp in sampled.top)
        return TokenLogprob(chosen.token, chosen.logprob, chosen.bytes, alternatives)
