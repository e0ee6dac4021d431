"""Per-request sampling settings and the pure function that picks the next token (gpt-fast style)."""

from __future__ import annotations

from dataclasses import dataclass

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


def sample(logits: torch.Tensor, p: SamplingParams, history: History, eos: frozenset[int]) -> int:
    """Pick the next token from logits [V] under a request's parameters."""
    if p.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(history.seen, penalised, logits)
    if p.presence_penalty or p.frequency_penalty:
        counts = history.counts
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    if eos and (p.ignore_eos or history.generated < p.min_tokens):
        logits = logits.clone()
        logits[list(eos)] = float("-inf")
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
    return int(torch.multinomial(probs, 1, generator=history.generator))
