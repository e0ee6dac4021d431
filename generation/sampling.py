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
        logits = kept if bool(torch.isfinite(kept).any()) else logits
    return logits


def pick(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """Pick a token from adjusted logits [V]: greedy at temperature 0, else top-k, top-p, then a draw."""
    if p.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= p.top_p
        drop[0] = False  # top_p 0 keeps just the most likely token
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


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
