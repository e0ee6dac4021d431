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
        # special tokens (`<|im_start|>`): the answer's text leaves them out, so their entries have no bytes (the
        # bytes of an answer's entries join to its text) and their name for a token
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._special = {i: str(t.content) for i, t in added.items() if getattr(t, "special", False)}
        if hasattr(tokenizer, "token_bytes"):  # a ChatGLM tokenizer: its special tokens are marked in its bytes
            marked = enumerate(tokenizer.token_bytes())
            self._special.update(
                (i, raw[1:].decode("utf-8", "replace")) for i, raw in marked if raw.startswith(b"\xff")
            )
        try:  # llguidance reads any Hugging Face fast tokenizer's vocabulary as bytes
            self._ll: Any = grammars_for(tokenizer, eos).tokenizer
        except Exception:  # a model's own tokenizer (ChatGLM-6B): its decoded text, whole characters only
            log.info("logprobs: token bytes from decoded text (the tokenizer is not a Hugging Face fast one)")
            self._ll = None

    def bytes(self, token: int) -> bytes:
        if token in self._special:
            return b""
        if self._ll is not None:
            raw = bytes(self._ll.decode_bytes([token]))
            if not raw:
                # llguidance marks a special token with a leading 0xFF byte, so the one token that is the byte 0xFF
                # itself (a byte-level vocabulary's "ÿ") reads back empty
                return b"\xff"
            return raw
        return str(self._tokenizer.decode([token])).encode()

    def top(self, token: int, logprob: float) -> TopLogprob:
        raw = self.bytes(token)
        return TopLogprob(self._special.get(token) or raw.decode("utf-8", "replace"), logprob, tuple(raw))

    def entry(self, sampled: Sampled) -> TokenLogprob:
        chosen = self.top(sampled.token, sampled.logprob)
        alternatives = tuple(self.top(t, lp) for t, lp in sampled.top)
        return TokenLogprob(chosen.token, chosen.logprob, chosen.bytes, alternatives)
