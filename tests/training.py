"""Teaching a tiny model a behaviour in the test that needs it: a few hundred optimizer steps on CPU make it emit a
fixed continuation for each of a few prompts. `learned` checks with `generate` that it did, before a server test
relies on it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def teach(model: Any, examples: Sequence[tuple[Sequence[int], Sequence[int]]], steps: int = 300) -> float:
    """Train `model` in place so that each prompt is followed by its continuation (the loss counts only the
    continuation's tokens); returns the last loss. The model goes back to inference mode afterwards."""
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=3e-3)
    batches = []
    for prompt, continuation in examples:
        ids = torch.tensor([[*prompt, *continuation]])
        labels = ids.clone()
        labels[0, : len(prompt)] = -100
        batches.append((ids, labels))
    model.train(True)
    loss = torch.tensor(0.0)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = sum((model(input_ids=ids, labels=labels).loss for ids, labels in batches), torch.tensor(0.0))
            loss.backward()
            optimizer.step()
    model.train(False)
    for p in params:
        p.requires_grad_(False)
    return float(loss.detach()) / len(batches)


def generate(model: Any, prompt: Sequence[int], stops: set[int], max_new: int = 200) -> list[int]:
    """Greedy continuation of `prompt` with transformers' own `generate`, up to and without a stop token."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(prompt)]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=sorted(stops),
            pad_token_id=sorted(stops)[0],
        )
    new = [int(t) for t in out[0, len(prompt) :]]
    return new[:-1] if new and new[-1] in stops else new


def learned(model: Any, examples: Sequence[tuple[Sequence[int], Sequence[int]]], stops: set[int]) -> bool:
    """Whether greedy decoding gives each prompt its continuation (a trailing stop token is not compared)."""
    for prompt, continuation in examples:
        want = [t for t in continuation if t not in stops]
        if generate(model, prompt, stops, len(continuation) + 2) != want:
            return False
    return True
