"""Constrained decoding: an answer held to a JSON schema, any JSON object, a regex, a list of choices or a Lark
grammar by masking each step's logits to the tokens that can continue it. The grammar work is llguidance's
(chosen by measurement: bench/README.md, "Grammar library"); this module compiles a request's constraint once per
tokenizer (cached), gives each sequence its own matcher, and fills the masks of a batch's constrained rows at once.

A constraint travels as plain data (`Constraint`) from the request to the prompt thread, where it is compiled
(`Grammars.compile`: an unsupported schema keyword or a bad regex is a `ConstraintError` naming it); the engine only
sees the compiled form (`CompiledConstraint.matcher()`) and the `Matcher` of each sequence."""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch

from generation.loop_guard import token_symbols
from generation.schema_closing import closed
from generation.structured import Constraint

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

CACHED = 64  # compiled constraints kept per tokenizer (a schema's first compile takes milliseconds)
COMPACT: JsonCompileOptions = {"whitespace_flexible": False}
QUIET = llguidance.LLParserLimits(verbose_errors=False)  # else an error quotes the parser's state and whole grammar


class ConstraintError(ValueError):
    """A constraint this server cannot hold an answer to; the message says why (a 400 naming `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param, self.message = param, message


def grammar_of(constraint: Constraint) -> str:
    """llguidance's grammar for a constraint."""
    kind, source = constraint.kind, constraint.source
    if kind in ("json_schema", "json_object"):
        schema = closed(json.loads(source)) if kind == "json_schema" else {"type": "object"}
        # compact JSON: a small model left free to choose whitespace can fill its whole answer with it
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT))
    if kind == "regex":
        return str(llguidance.LLMatcher.grammar_from_regex(source))
    if kind == "choice":  # each choice a Lark string literal (JSON escapes are Lark's)
        choices = json.loads(source)
        return str(llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices)))
    return str(llguidance.LLMatcher.grammar_from_lark(source))


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int, symbols: np.ndarray | None) -> None:
        self.ll = matcher
        self.vocab = vocab  # the tokenizer's tokens, the width of its masks
        # a JSON answer, which the loop guard may keep from repeating: each token's symbol [V] (digits one); None: not
        self.symbols = symbols

    def consume(self, token: int) -> None:
        self.ll.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more: the answer ends here."""
        return bool(self.ll.is_stopped())

    @property
    def error(self) -> str | None:
        return str(self.ll.get_error()) if self.ll.is_error() else None


class CompiledConstraint:
    """A constraint compiled for one tokenizer; `matcher()` is a fresh one for each sequence (a cheap copy)."""

    def __init__(self, template: llguidance.LLMatcher, vocab: int, symbols: np.ndarray | None) -> None:
        self._template = template
        self._vocab = vocab
        self._symbols = symbols
        self._lock = threading.Lock()  # copied from the prompt threads and the engine's

    def matcher(self) -> Matcher:
        with self._lock:
            return Matcher(self._template.deep_copy(), self._vocab, self._symbols)


class Grammars:
    """Compiles constraints for one model's tokenizer, keeping the last `CACHED`."""

    def __init__(self, tokenizer: Any, eos: tuple[int, ...] = ()) -> None:
        # the model's own end tokens (a chat model's end of turn), where the tokenizer's default may be another
        self.tokenizer = ll_tokenizer(tokenizer, eos)
        self._cache: OrderedDict[Constraint, CompiledConstraint] = OrderedDict()
        self._lock = threading.Lock()
        self._symbols: np.ndarray | None = None

    def symbols(self) -> np.ndarray:
        """Each token's symbol for the loop guard [V] (digits one), read from the vocabulary on first use (tens of
        milliseconds); shared by every JSON answer, so read-only."""
        with self._lock:
            if self._symbols is None:
                pieces = [self.tokenizer.decode_bytes([i]) for i in range(self.tokenizer.vocab_size)]
                self._symbols = token_symbols(pieces)
                self._symbols.flags.writeable = False
            return self._symbols

    def compile(self, constraint: Constraint) -> CompiledConstraint:
        """The compiled constraint, from the cache when it was compiled before. Raises ConstraintError."""
        key = Constraint(constraint.kind, constraint.source, "")
        with self._lock:
            if (hit := self._cache.get(key)) is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(constraint)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHED:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, constraint: Constraint) -> CompiledConstraint:
        try:
            grammar = grammar_of(constraint)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ConstraintError(constraint.param, f"'{constraint.param}' cannot be used: {exc}") from exc
        # an error here is also a schema keyword the library does not enforce ("Unimplemented keys"): refused, never
        # a silently looser answer
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed or messages:
            why = "; ".join(m.strip().splitlines()[0] for m in messages if m.strip()) or "it does not compile"
            raise ConstraintError(constraint.param, f"'{constraint.param}' cannot be used: {why}")
        template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=QUIET)
        if template.is_error():
            raise ConstraintError(constraint.param, f"'{constraint.param}' cannot be used: {template.get_error()}")
        # JSON must come to an end; a regex or grammar may ask for repetition, so only JSON answers are guarded
        guarded = constraint.kind in ("json_schema", "json_object")
        return CompiledConstraint(template, self.tokenizer.vocab_size, self.symbols() if guarded else None)


class _Vocabulary:
    """A model's own tokenizer (ChatGLM's) as llguidance's TokenizerWrapper reads one."""

    def __init__(self, tokenizer: Any, eos: tuple[int, ...]) -> None:
        self.tokens = tokenizer.token_bytes()
        self.eos_token_id = eos[0] if eos else tokenizer.eos_token_id
        self.bos_token_id = None
        self.special_token_ids = [i for i, t in enumerate(self.tokens) if t.startswith(b"\xff")]
        self._tokenizer = tokenizer

    def __call__(self, text: bytes) -> list[int]:
        return list(self._tokenizer.tokenize_bytes(text))


def ll_tokenizer(tokenizer: Any, eos: tuple[int, ...]) -> llguidance.LLTokenizer:
    """llguidance's view of a tokenizer: a Hugging Face fast one, or one that lists its tokens' bytes."""
    if hasattr(tokenizer, "token_bytes"):
        vocabulary = _Vocabulary(tokenizer, eos)
        wrapper = llguidance.TokenizerWrapper(vocabulary)
        return llguidance.LLTokenizer(wrapper, n_vocab=len(vocabulary.tokens), eos_token=list(eos) or None)
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=list(eos) or None)


@functools.lru_cache(maxsize=4)
def grammars_for(tokenizer: Any, eos: tuple[int, ...] = ()) -> Grammars:
    """The Grammars of a model's tokenizer and end tokens (made once: reading a vocabulary takes a fraction of a
    second). Raises what llguidance raises for a tokenizer it cannot read (not a Hugging Face fast tokenizer)."""
    return Grammars(tokenizer, eos)


_EXECUTOR = llguidance.LLExecutor()  # llguidance's own threads: the masks of a batch are filled in parallel


def apply_masks(logits: torch.Tensor, rows: list[int], matchers: list[Matcher]) -> None:
    """Logits [B, V] of the constrained `rows` set to -inf where their matcher allows no token; logits past the
    tokenizer's tokens (a model's padding) are never allowed.

    The bitmask is unpacked with numpy: llguidance's own `apply_token_bitmask_inplace` is built with torch.compile on
    a CPU, which takes seconds on its first call and a C++ compiler at run time (bench/README.md)."""
    vocab = matchers[0].vocab  # one model, one tokenizer
    bitmask = llguidance.torch.allocate_token_bitmask(len(rows), vocab)
    if len(rows) == 1:
        llguidance.torch.fill_next_token_bitmask(matchers[0].ll, bitmask, 0)
    else:
        llguidance.torch.fill_next_token_bitmask_par(_EXECUTOR, [(m.ll, i) for i, m in enumerate(matchers)], bitmask)
    allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=vocab, bitorder="little").view(np.bool_)
    width = logits.shape[-1]
    blocked = torch.ones(len(rows), width, dtype=torch.bool)  # past the tokenizer's tokens: never
    blocked[:, : min(vocab, width)] = torch.from_numpy(~allowed[:, :width])
    index = torch.tensor(rows, device=logits.device)
    constrained = logits.index_select(0, index).masked_fill_(blocked.to(logits.device), float("-inf"))
    logits.index_copy_(0, index, constrained)
