"""Per-request sampling settings and the pure function that picks the next token (gpt-fast style)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # None: none; k: each token's logprob and the k likeliest (0-20)
    constraint: Any = None  # a CompiledConstraint (generation/constraints.py): each sequence gets its own matcher
    tools: Any = None  # a ToolCalling (generation/output.py): the answer's calls are read out of its text
    raw_text: bool = False  # a raw prompt's answer: the model's text as it is, without the family's post-processing


@dataclass
class History:
    """What sampling needs of a request's past: its tokens so far and its own random stream."""

    generator: torch.Generator
    seen: torch.Tensor  # [V] bool: tokens of prompt + output, for repetition_penalty
    counts: torch.Tensor  # [V] float: output token counts, for presence/frequency penalties
    generated: int = 0

    @classmethod
    def of(cls, prompt: list[int], vocab: int, generator: torch.Generator, device: torch.device) -> History:
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        seen[[t for t in prompt if t < vocab]] = True
        return cls(generator, seen, torch.zeros(vocab, device=device))

    def add(self, token: int) -> None:
        self.counts[token] += 1
        self.seen[token] = True
        self.generated += 1


@dataclass(frozen=True)
class Sampled:
    """A picked token; with logprobs asked for, its log-probability and the likeliest tokens (id, logprob), from the
    distribution OpenAI defines: after penalties, bias and constraints, before temperature."""

    token: int
    logprob: float = 0.0
    top: tuple[tuple[int, float], ...] = ()


def adjust(logits: torch.Tensor, p: SamplingParams, history: History, eos: frozenset[int]) -> torch.Tensor:
    """Logits [V] after the request's penalties, bias and end-of-sequence rule (a constraint's mask is already in)."""
    if p.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(history.seen, penalised, logits)
    if p.presence_penalty or p.frequency_penalty:
        counts = history.counts
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    if p.logit_bias:
        ids, bias = zip(*p.logit_bias, strict=True)
        logits = logits.clone()
        logits[list(ids)] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
    if eos and (p.ignore_eos or history.generated < p.min_tokens):
        kept = logits.clone()
        kept[list(eos)] = float("-inf")
        # a constraint may allow nothing but the end (its grammar is complete): then the end it is
        logits = kept if bool(kept.amax() > float("-inf")) else logits
    return logits


def pick(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """Pick a token from adjusted logits [V]: greedy at temperature 0, else top-k, top-p, then a draw.

    Nothing here touches the whole vocabulary more than a few times: sorting 49,152 probabilities took 3.4 ms and
    `torch.multinomial` 1.0 ms on a 2-core AVX2 CPU (its exponential draws, mostly), against a decode step of 15 ms
    (bench/README.md, "Sampling"), so top-p looks for its nucleus among the likeliest few tokens first, and the
    draw runs multinomial's race on cheaper uniform numbers."""
    if p.temperature == 0:
        return int(torch.argmax(logits))
    vocab = logits.shape[-1]
    logits = logits.float() / p.temperature
    ids: torch.Tensor | None = None  # the candidates' token ids, likeliest first (None: every token, in id order)
    if 0 < p.top_k < vocab:
        logits, ids = top_k(logits, p.top_k)
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        probs, ids = nucleus(probs, ids, p.top_p)
    return draw(probs, ids, vocab, generator)


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits [n] and their ids [n], largest first, with every token tied with the k-th (n ≥ k: a cut
    at the k-th logit keeps them all, as transformers' and gpt-fast's do; bf16 logits tie often). Ties at -inf are
    left out: they could never be drawn."""
    values, ids = torch.topk(logits, k)
    kth = values[-1]
    if bool(kth > float("-inf")) and (tied := int((logits >= kth).sum())) > k:
        values, ids = torch.topk(logits, tied)
    return values, ids


# how many of the likeliest tokens top-p looks among, in turn, before it sorts the whole distribution: a partial
# selection of 256 of 49,152 took 0.1 ms and of 4,096 0.8 ms on a 2-core AVX2 CPU, a whole sort 3.4 ms
NUCLEUS_STAGES = (256, 4096)


def nucleus(probs: torch.Tensor, ids: torch.Tensor | None, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of likeliest tokens whose mass reaches `top_p` (the likeliest always stays): their
    probabilities [n] and token ids [n], likeliest first. `probs` [V] is over `ids` (None: every token in id order,
    unsorted; else sorted already, as top-k leaves it). The likeliest few (NUCLEUS_STAGES) are selected first: the
    set is the one a full sort gives whenever it ends among them, and only a set that reaches past them looks
    further."""
    if ids is None:
        for first in (n for n in NUCLEUS_STAGES if n < probs.shape[-1]):
            values, order = torch.topk(probs, first)  # [first], sorted
            kept = _kept(values, top_p)
            if kept < first:
                return values[:kept], order[:kept]
        probs, ids = torch.sort(probs, descending=True)
    kept = _kept(probs, top_p)
    return probs[:kept], ids[:kept]


def _kept(ordered: torch.Tensor, top_p: float) -> int:
    """How many of the probabilities `ordered` (likeliest first) the nucleus keeps: those with less than `top_p`
    of mass before them, and at least one."""
    before = torch.cumsum(ordered, dim=-1) - ordered
    return max(1, int((before < top_p).sum()))


def draw(probs: torch.Tensor, ids: torch.Tensor | None, vocab: int, generator: torch.Generator) -> int:
    """A token drawn from (unnormalised) probabilities [n] over `ids` (None: token i is id i) by the exponential
    race torch.multinomial runs for one sample: each token's probability over an Exp(1) draw of its own, the
    largest wins. The draws are keyed by token id (one uniform number per token of the `vocab`, 0.14 ms for 49,152
    on a 2-core AVX2 CPU), so a slight change in the probabilities changes the winner only where two were close: a
    prompt served from the prefix cache computes its logits a little differently, and a seed still gives the same
    answer (inverting the cumulative distribution instead shifted every later boundary: 81% of draws kept against
    99% here, under logits moved by 0.02). A zero-probability token never wins; NaN or infinite logits raise."""
    total = probs.sum()
    if not bool(torch.isfinite(total)) or not bool(total > 0):
        raise ValueError(f"cannot sample: the token probabilities sum to {float(total)} (NaN or infinite logits)")
    uniform = torch.rand(vocab, generator=generator, device=probs.device)
    own = uniform if ids is None else uniform[ids]
    i = int(torch.argmax(probs / own.log().neg_()))  # -log(U) ~ Exp(1); U = 0 gives inf: that token cannot win
    return i if ids is None else int(ids[i])


def sample(logits: torch.Tensor, p: SamplingParams, history: History, eos: frozenset[int]) -> Sampled:
    """Pick the next token from logits [V] under a request's parameters."""
    adjusted = adjust(logits, p, history, eos)
    token = pick(adjusted, p, history.generator)
    if p.logprobs is None:
        return Sampled(token)
    logprobs = torch.log_softmax(adjusted.float(), dim=-1)
    top = torch.topk(logprobs, p.logprobs) if p.logprobs else None
    pairs = () if top is None else tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return Sampled(token, float(logprobs[token]), pairs)
